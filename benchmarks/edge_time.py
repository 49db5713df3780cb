"""Time to accuracy over edge links: WASH, PAPA and FedAvg on the same members, data and
rounds, through a real deployment whose SuperNodes sit behind tbf-shaped links
(:mod:`deploy.namespaces`), at several link rates and for two model sizes.

For every run it prints the mean round time in parts (:mod:`wash_fed.timing`: the critical
member's compute, waiting for a slot, Flower's delivery, transfer -- the link both ways with
the polls no app process can time -- and the server), the bytes sent, the final accuracy and
the time to reach the target accuracy; it draws test accuracy against wall time, one panel per link
rate, into ``<out>/edge_time_<model>.png``, with the table in ``edge_time_<model>.md`` and
every run's results in ``edge_time_<model>.json``. Requires root.

    sudo .venv/bin/python benchmarks/edge_time.py --models cnn --rates 100,10,2
    sudo .venv/bin/python benchmarks/edge_time.py --models torchvision:resnet18 --rates 100,10

``--deployment hosts`` runs through the deployment across machines instead, emulated on this
machine (:mod:`deploy.emulated_hosts`: the server host's compose stack and two node hosts of
3 and 2 members, each its own compose project behind its own link); a rate is then host A's,
and host B's link is half as fast:

    sudo .venv/bin/python benchmarks/edge_time.py --deployment hosts \\
        --models torchvision:resnet18 --rates 20 --strategies wash,fedavg

A run "has" a model of some accuracy from the moment one was evaluated: FedAvg's global
model after each round; for PAPA and WASH the members (their mean accuracy) after each
round, and the soup when the run ends. The target is ``--target`` times the best final
accuracy any strategy reached with that model, so it means the same for every strategy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flwr.common.config import parse_config_args
from pydantic import TypeAdapter

from deploy.emulated_hosts import TWO_HOSTS, EmulatedDeployment
from deploy.engine import StackError
from deploy.flwr_cli import FlwrError, results_file_in
from deploy.namespaces import EdgeFederation, EdgeTopology, TopologyError, unwind_on_sigterm
from wash_fed.config import ConfigValue
from wash_fed.results import RunResult, read_results
from wash_fed.timing import PARTS, RoundTime

STRATEGIES = ("wash", "papa", "fedavg")
SHARED: dict[str, ConfigValue] = {
    "num-server-rounds": 4,
    "batch-size": 64,
    "train-subset": 12000,
    "holdout-size": 500,
    "test-subset": 2000,
    "test-on-server": True,
    "eval-every": 1,
    "papa-every": 2,
    "poll-interval": 0.2,
}
"""Every run's configuration; ``--run-config`` adds to it (per model: ``LOCAL_STEPS``)."""
LOCAL_STEPS = {"cnn": 30, "torchvision:resnet18": 15}
"""Local steps per round by model (default ``DEFAULT_STEPS``): the larger model costs more
per step on a CPU."""
DEFAULT_STEPS = 15


@dataclass(frozen=True)
class EdgeRun:
    """One run of the benchmark: its model, link rate and strategy, and its results."""

    model: str
    mbit: float
    strategy: str
    results: RunResult
    deployment: str = "namespaces"
    """``namespaces`` (every member behind a link of ``mbit``) or ``hosts`` (``mbit`` is host
    A's link, host B's is half as fast)."""

    def link(self) -> str:
        """The link rates, as the table and the plot give them."""
        if self.deployment == "hosts":
            a, b = (plan.mbit * self.mbit / TWO_HOSTS[0].mbit for plan in TWO_HOSTS)
            return f"A {a:g}, B {b:g}"
        return f"{self.mbit:g}"


EDGE_RUNS = TypeAdapter(list[EdgeRun])
"""How ``edge_time_<model>.json`` holds a model's runs."""


@dataclass(frozen=True)
class EdgeSummary:
    """One run's row: seconds per round (in all and by part), bytes, accuracies, times."""

    round: float
    parts: RoundTime
    megabytes: float
    last_round: float | None
    """The accuracy the last round evaluated (None: none evaluated)."""
    final_accuracy: float
    wall: float
    to_target: float | None
    """Seconds until a model of the target accuracy was there (None: never)."""


def curve(results: RunResult) -> list[tuple[float, float]]:
    """(seconds since the run started, test accuracy) of every model the run evaluated: each
    round's (members' mean, or FedAvg's global model), then the final model."""
    points = [(r.elapsed, r.test_accuracy) for r in results.rounds if r.test_accuracy is not None]
    points.append((results.wall_seconds, results.final_figures().final_accuracy))
    return points


def time_to(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first time a model of at least ``target`` accuracy was there (None: never)."""
    return next((t for t, accuracy in points if accuracy >= target), None)


def summary(results: RunResult, target: float) -> EdgeSummary:
    """One run's row: mean seconds per round by part, bytes, accuracy, times."""
    points = curve(results)
    return EdgeSummary(
        round=results.mean_round_seconds(),
        parts=results.mean_round_time(),
        megabytes=results.sent() / 1e6,
        last_round=points[-2][1] if len(points) > 1 else None,
        final_accuracy=points[-1][1],
        wall=results.wall_seconds,
        to_target=time_to(points, target),
    )


def table(runs: Sequence[EdgeRun], target_fraction: float) -> str:
    """Markdown: one row per (model, rate, strategy)."""
    columns = ["model", "link (Mbit/s)", "strategy", "s/round", *PARTS, "sent (MB)"]
    columns += ["last round", "final model", "wall (s)", "to target (s)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for model in dict.fromkeys(r.model for r in runs):
        of_model = [r for r in runs if r.model == model]
        best = max(r.results.final_figures().final_accuracy for r in of_model)
        target = target_fraction * best
        for run in of_model:
            row = summary(run.results, target)
            reached = "never" if row.to_target is None else f"{row.to_target:.0f}"
            last = "-" if row.last_round is None else f"{row.last_round:.4f}"
            parts = " | ".join(f"{getattr(row.parts, p):.1f}" for p in PARTS)
            lines.append(
                f"| {model} | {run.link()} | {run.strategy} | {row.round:.1f} | "
                f"{parts} | {row.megabytes:.1f} | {last} | {row.final_accuracy:.4f} | "
                f"{row.wall:.0f} | {reached} |"
            )
        lines.append(f"| {model}: target accuracy {target:.4f} |" + " |" * (len(columns) - 1))
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[EdgeRun], out: Path) -> list[Path]:
    """Accuracy against wall time: one figure per model, one panel per link rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model in dict.fromkeys(r.model for r in runs):
        rates = list(dict.fromkeys(r.link() for r in runs if r.model == model))
        fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 3.8), squeeze=False)
        for ax, link in zip(axes[0], rates, strict=True):
            for run in runs:
                if run.model != model or run.link() != link:
                    continue
                times, accuracies = zip(*curve(run.results), strict=True)
                (line,) = ax.plot(times[:-1], accuracies[:-1], marker="o", markersize=3)
                ax.plot(
                    times[-1:],
                    accuracies[-1:],
                    marker="*",
                    markersize=12,
                    color=line.get_color(),
                    linestyle="none",
                )
                line.set_label(run.strategy)
            ax.set_title(f"{model}, {link} Mbit/s links")
            ax.grid(True, alpha=0.3)
        fig.supxlabel("wall time (s); dots: members (FedAvg: global) per round; star: final")
        fig.supylabel("test accuracy")
        axes[0][-1].legend()
        fig.tight_layout()
        paths.append(out / f"edge_time_{model.replace(':', '_')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


class RunNotCompletedError(RuntimeError):
    """A run that did not complete; the message says how it ended."""


class Deployment(Protocol):
    """Where the benchmark's runs go: links shaped to a rate, runs taken to their end."""

    name: str

    def shape(self, mbit: float) -> None: ...

    def complete(self, config: Mapping[str, ConfigValue]) -> RunResult:
        """The results of a run of ``config`` that completed; RunNotCompletedError otherwise."""
        ...


@dataclass
class OverNamespaces:
    """Every member behind a link of its own (:class:`deploy.namespaces.EdgeFederation`);
    results written under ``out``."""

    federation: EdgeFederation
    out: Path
    name: str = "namespaces"

    def shape(self, mbit: float) -> None:
        self.federation.topology.shape(mbit)

    def complete(self, config: Mapping[str, ConfigValue]) -> RunResult:
        ended = self.federation.run({**config, "output-dir": str(self.out)}, echo=False)
        found = results_file_in(ended.output)
        if not ended.completed or found is None:
            raise RunNotCompletedError(f"{ended.status}: {ended.details}")
        return read_results(found)


@dataclass
class OverHosts:
    """The emulated server host and node hosts (:mod:`deploy.emulated_hosts`): host A's
    link at the rate, host B's at its share of it; each run's folder fetched into ``out``."""

    deployment: EmulatedDeployment
    out: Path
    name: str = "hosts"

    def shape(self, mbit: float) -> None:
        self.deployment.shape(mbit / self.deployment.plans[0].mbit)

    def complete(self, config: Mapping[str, ConfigValue]) -> RunResult:
        server = self.deployment.server
        overrides = {**config, "num-members": self.deployment.members, "output-dir": SERVER_RUNS}
        ended = server.run(overrides, timeout=RUN_TIMEOUT)
        if not ended.completed:
            raise RunNotCompletedError(f"{ended.status}: {ended.details}")
        return read_results(server.fetch_run(SERVER_RUNS, ended.run_id, self.out) / "results.json")


SERVER_RUNS = "/app/runs"
"""Where runs write their folders in the server host's SuperLink container."""
RUN_TIMEOUT = 4 * 3600


@contextmanager
def deployment(kind: str, members: int, out: Path) -> Iterator[Deployment]:
    """The deployment ``kind`` (``namespaces`` or ``hosts``) up, torn down on the way out."""
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="wf-edge-"))
    if kind == "hosts":
        with EmulatedDeployment(home, home / "keys") as hosts:
            yield OverHosts(hosts, out)
    else:
        with EdgeFederation(EdgeTopology(members, 100.0), home) as federation:
            yield OverNamespaces(federation, out)


def run_all(
    runs_on: Deployment,
    models: Sequence[str],
    rates: Sequence[float],
    strategies: Sequence[str],
    overrides: Mapping[str, ConfigValue],
) -> list[EdgeRun]:
    """Every (model, rate, strategy), one after the other over the same SuperNodes; a run
    that does not complete is reported and left out."""
    runs = []
    for model in models:
        for mbit in rates:
            runs_on.shape(mbit)
            for strategy in strategies:
                config: dict[str, ConfigValue] = {
                    **SHARED,
                    "model": model,
                    "local-steps": LOCAL_STEPS.get(model, DEFAULT_STEPS),
                    "strategy": strategy,
                    **overrides,
                }
                print(f"=== {model}, {mbit:g} Mbit/s, {strategy}", flush=True)
                try:
                    results = runs_on.complete(config)
                except RunNotCompletedError as failed:  # reported, left out, the rest go on
                    print(f"    {failed}", file=sys.stderr, flush=True)
                    continue
                runs.append(EdgeRun(model, mbit, strategy, results, runs_on.name))
                final = results.final_figures().final_accuracy
                print(f"    {results.wall_seconds:.0f} s, accuracy {final:.4f}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="100,10,2", help="link rates, Mbit/s")
    parser.add_argument("--models", default="cnn")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--deployment",
        choices=("namespaces", "hosts"),
        default="namespaces",
        help="members behind links of their own, or the emulated node hosts (5 members)",
    )
    parser.add_argument("--members", type=int, default=3, help="with --deployment namespaces")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--run-config", default="", help="more overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("runs") / "edge_time")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        default=None,
        help="only write tables and plots from these edge_time_<model>.json files",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        runs = [run for path in args.render for run in EDGE_RUNS.validate_json(path.read_bytes())]
        return write_reports(runs, out, args.target)
    overrides = parse_config_args([args.run_config]) if args.run_config.strip() else {}
    rates = [float(r) for r in args.rates.split(",")]
    try:
        with deployment(args.deployment, args.members, out / "runs") as runs_on:
            runs = run_all(
                runs_on, args.models.split(","), rates, args.strategies.split(","), overrides
            )
    except (TopologyError, StackError, FlwrError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_reports(runs, out, args.target)
    planned = len(args.models.split(",")) * len(rates) * len(args.strategies.split(","))
    return 0 if len(runs) == planned else 1


def write_reports(runs: Sequence[EdgeRun], out: Path, target: float) -> int:
    """Per model: its runs as JSON, its table (printed too) and its plot, into ``out``;
    returns 0."""
    for model in dict.fromkeys(r.model for r in runs):
        of_model = [r for r in runs if r.model == model]
        name = f"edge_time_{model.replace(':', '_')}"
        (out / f"{name}.json").write_bytes(EDGE_RUNS.dump_json(of_model, indent=2))
        text = table(of_model, target)
        (out / f"{name}.md").write_text(text)
        print(f"\n{text}")
    paths = plot(runs, out)
    print("written to", out, ":", ", ".join(p.name for p in paths))
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    sys.exit(main())
