"""The time model (:mod:`wash_fed.time_model`) against real runs: members behind links of
their own (:mod:`deploy.namespaces`, tbf-shaped), WASH and FedAvg, one model per call.

1. Flower's floor app (``benchmarks/flower_floor``: a ClientApp that answers at once) over
   the same SuperNodes: Flower's delivery of a round (:meth:`Delivery.calibrated`).
2. One run per strategy at ``--calibrate-at`` Mbit/s: what each message round is made of --
   each member's bytes and compute, the server's seconds -- and the server's time outside
   message rounds.
3. One run per strategy at each of ``--rates``: its mean training round and its whole run
   predicted from (1) and (2) with the run's link rate, beside what it measured.

The calibration runs are predicted too (their rows say so): only their compute, bytes and
server time go into the model, not their delivery. Requires root.

    sudo .venv/bin/python benchmarks/time_model.py --model cnn --rates 10,1
    sudo .venv/bin/python benchmarks/time_model.py --model torchvision:resnet18 --rates 100,20 \\
        --run-config "local-steps=5"
    .venv/bin/python benchmarks/time_model.py --render runs/time_model/time_model_*.json

``--rates ''`` runs the floor and the calibration runs only: what the crossover map needs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_time import DEFAULT_STEPS, LOCAL_STEPS, SHARED, OverNamespaces, RunNotCompletedError
from flwr.common.config import parse_config_args
from pydantic import TypeAdapter

from deploy.flwr_cli import PROJECT, FlwrError
from deploy.namespaces import EdgeFederation, EdgeTopology, TopologyError, unwind_on_sigterm
from wash_fed.config import ConfigValue
from wash_fed.results import ExchangeResult, RoundResult, RunResult
from wash_fed.time_model import Delivery, Link, MessageRound, Setting, round_time, run_seconds

FLOOR_APP = PROJECT / "benchmarks" / "flower_floor"
STRATEGIES = ("wash", "fedavg")
WITHIN = 0.15
"""The largest relative error the model's check accepts."""


@dataclass(frozen=True)
class Composition:
    """A run's message rounds, per member, as measured: the hello, the training rounds, the
    final step's; each one's way there and back (slot, delivery and transfer); and the
    server's seconds outside them."""

    setup: list[MessageRound]
    training: list[MessageRound]
    final: list[MessageRound]
    ways: list[tuple[MessageRound, float]]
    outside: float

    @classmethod
    def of(cls, results: RunResult) -> Composition:
        members = results.config.num_members
        first = results.rounds[0].elapsed - results.rounds[0].seconds if results.rounds else 0.0
        setup: list[MessageRound] = []
        training: list[MessageRound] = []
        final: list[MessageRound] = []
        ways = []
        rows: list[tuple[RoundResult | ExchangeResult, list[MessageRound]]]
        rows = [(r, training) for r in results.rounds]
        rows += [(e, setup if e.elapsed <= first else final) for e in results.exchanges]
        for row, part in rows:
            if row.time is None:
                continue
            t = row.time
            measured = MessageRound(
                row.bytes_down / members, row.bytes_up / members, t.compute, t.server
            )
            part.append(measured)
            ways.append((measured, t.slot + t.delivery + t.transfer))
        inside = sum(r.seconds for r in results.rounds) + sum(e.seconds for e in results.exchanges)
        return cls(setup, training, final, ways, max(results.wall_seconds - inside, 0.0))

    def predicted(self, setting: Setting) -> tuple[float, float]:
        """The mean training round and the whole run, in ``setting``."""
        rounds = [sum(round_time(r, setting).as_dict().values()) for r in self.training]
        run = run_seconds([*self.setup, *self.training, *self.final], setting) + self.outside
        return statistics.fmean(rounds), run


def fitted_delivery(
    ways: Sequence[tuple[MessageRound, float]], floor: Delivery, members: int, link: Link
) -> Delivery:
    """``floor`` (Flower's own, from the floor app) plus an app's own cost of a message round
    beyond it: a fixed part and a part per byte, fitted (least squares, neither below 0) to
    measured ways (a message round and its slot, delivery and transfer) less their link's
    share on ``link`` and the floor."""
    nbytes = [r.down + r.up for r, _ in ways]
    beyond = [way - link.seconds(r.down, r.up) - floor.seconds(members) for r, way in ways]
    per_byte = 0.0
    if len(set(nbytes)) > 1:
        per_byte = max(statistics.linear_regression(nbytes, beyond).slope, 0.0)
    fixed = statistics.fmean(b - per_byte * n for b, n in zip(beyond, nbytes, strict=True))
    return Delivery(floor.fixed + max(fixed, 0.0), floor.poll, per_byte)


@dataclass(frozen=True)
class CheckRun:
    """One measured run beside its calibration (the same model and strategy, at
    ``calibration_mbit``)."""

    model: str
    strategy: str
    mbit: float
    members: int
    floor_round: float
    calibration_mbit: float
    calibrations: list[RunResult]
    """Every strategy's calibration run of this model: the app's own delivery is fitted
    over all their message rounds."""
    measured: RunResult

    @property
    def calibration(self) -> RunResult:
        """The calibration run of this strategy: its rounds' compute, bytes and server time."""
        return next(r for r in self.calibrations if r.strategy == self.strategy)

    @property
    def calibrating(self) -> bool:
        return self.mbit == self.calibration_mbit

    def delivery(self) -> tuple[Delivery, Delivery]:
        """Flower's floor, and the delivery the model uses: the floor and this app's own."""
        floor = Delivery.calibrated(self.floor_round, self.members)
        ways = [way for run in self.calibrations for way in Composition.of(run).ways]
        return floor, fitted_delivery(ways, floor, self.members, Link(self.calibration_mbit))

    def predicted(self) -> tuple[float, float]:
        setting = Setting(self.members, self.delivery()[1], Link(self.mbit))
        return Composition.of(self.calibration).predicted(setting)

    def measured_times(self) -> tuple[float, float]:
        return self.measured.mean_round_seconds(), self.measured.wall_seconds


CHECK_RUNS = TypeAdapter(list[CheckRun])


def error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def table(runs: Sequence[CheckRun]) -> str:
    """Markdown: one row per run, predicted beside measured; then the floor and the verdict."""
    lines = [
        "| model | strategy | link (Mbit/s) | s/round predicted | measured | error "
        "| run (s) predicted | measured | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for run in runs:
        (round_p, run_p), (round_m, run_m) = run.predicted(), run.measured_times()
        errors = error(round_p, round_m), error(run_p, run_m)
        if not run.calibrating:
            worst = max(worst, *map(abs, errors))
        link = f"{run.mbit:g}" + (" (calibration)" if run.calibrating else "")
        lines.append(
            f"| {run.model} | {run.strategy} | {link} | {round_p:.1f} | {round_m:.1f} "
            f"| {errors[0]:+.0%} | {run_p:.0f} | {run_m:.0f} | {errors[1]:+.0%} |"
        )
    lines.append("")
    for run in {r.model: r for r in runs if r.calibrating}.values():
        floor, delivery = run.delivery()
        lines.append(
            f"{run.model}: Flower's floor {floor.seconds(run.members):.2f} s "
            f"a message round with {run.members} members (fixed {floor.fixed:.2f} s and a "
            f"poll of up to {floor.poll:g} s); this app's own "
            f"+{delivery.fixed - floor.fixed:.2f} s and {delivery.per_byte * 1e6:.3f} s a MB."
        )
    if all(run.calibrating for run in runs):
        lines.append("\nNo checked runs: calibration only.")
    else:
        verdict = "within" if worst <= WITHIN else "NOT within"
        lines.append(f"\nLargest error of a checked run: {worst:.0%} ({verdict} {WITHIN:.0%}).")
    return "\n".join(lines) + "\n"


def floor_round(federation: EdgeFederation, members: int, rounds: int) -> float:
    """The floor app's median round after the first, over ``federation``."""
    ended = federation.harness.run(
        {
            "num-members": members,
            "num-server-rounds": rounds,
            "poll-interval": SHARED["poll-interval"],
        },
        app=FLOOR_APP,
        echo=False,
    )
    found = re.search(r"floor rounds: (\[.*?\])", ended.output)
    if not ended.completed or found is None:
        raise RunNotCompletedError(f"the floor app: {ended.status}: {ended.output[-2000:]}")
    seconds = json.loads(found.group(1))
    return float(statistics.median(seconds[1:] or seconds))


def check(
    model: str,
    rates: Sequence[float],
    calibrate_at: float,
    members: int,
    overrides: Mapping[str, ConfigValue],
    out: Path,
) -> list[CheckRun]:
    """The floor, the calibration runs and the checked runs of ``model``, in that order (the
    predictions come once every calibration run is in)."""
    home = Path(tempfile.mkdtemp(prefix="wf-model-"))
    runs: list[CheckRun] = []
    with EdgeFederation(EdgeTopology(members, calibrate_at), home) as federation:
        runs_on = OverNamespaces(federation, out)
        floor = floor_round(federation, members, rounds=8)
        print(f"=== Flower's floor: {floor:.2f} s per round", flush=True)
        measured: dict[float, dict[str, RunResult]] = {}
        for mbit in [calibrate_at, *rates]:
            runs_on.shape(mbit)
            for strategy in STRATEGIES:
                config = {
                    **SHARED,
                    "model": model,
                    "local-steps": LOCAL_STEPS.get(model, DEFAULT_STEPS),
                    "strategy": strategy,
                    **overrides,
                }
                print(f"=== {model}, {mbit:g} Mbit/s, {strategy}", flush=True)
                results = runs_on.complete(config)
                measured.setdefault(mbit, {})[strategy] = results
                print(
                    f"    round {results.mean_round_seconds():.1f} s, "
                    f"run {results.wall_seconds:.0f} s",
                    flush=True,
                )
    calibration = measured[calibrate_at]
    for mbit, of_rate in measured.items():
        for strategy, results in of_rate.items():
            runs.append(
                CheckRun(
                    model,
                    strategy,
                    mbit,
                    members,
                    floor,
                    calibrate_at,
                    list(calibration.values()),
                    results,
                )
            )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="cnn")
    parser.add_argument(
        "--rates", default="10,1", help="the checked runs' link rates, Mbit/s ('': none)"
    )
    parser.add_argument("--calibrate-at", type=float, default=1000.0, help="Mbit/s")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--run-config", default="", help="more overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("runs") / "time_model")
    parser.add_argument("--render", type=Path, nargs="+", default=None, help="JSON files only")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        runs = [run for path in args.render for run in CHECK_RUNS.validate_json(path.read_bytes())]
        print(table(runs))
        return 0
    unwind_on_sigterm()
    overrides = parse_config_args([args.run_config]) if args.run_config.strip() else {}
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    try:
        runs = check(args.model, rates, args.calibrate_at, args.members, overrides, out / "runs")
    except (TopologyError, FlwrError, RunNotCompletedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = f"time_model_{args.model.replace(':', '_')}"
    (out / f"{name}.json").write_bytes(CHECK_RUNS.dump_json(runs, indent=2))
    text = table(runs)
    (out / f"{name}.md").write_text(text)
    print(f"\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
