"""The accuracy-against-bytes frontier: every strategy at several operating points, over
several seeds, on the population trainer (the Flower app's protocol, bytes as they would
travel; :mod:`wash_fed.population`).

Every point trains each member for the same total number of local steps and differs only in
how the members communicate: FedAvg averages every ``steps / R`` steps for R rounds; WASH
shuffles a fraction ``p`` of the weights after every round; PAPA pulls members toward their
mean every few rounds; independent members communicate only at the end. Bytes are the
ledger's: training rounds and the final step (collection, BatchNorm statistics).

    python -m simulations.frontier --partition full --seeds 0,1,2
    python -m simulations.frontier --partition dirichlet --alpha 0.3 --seeds 0,1,2

Each finished (point, seed) is appended to ``<out>/runs.jsonl`` at once; run the same
command again after an interruption and it continues with what is missing. The table
(``frontier.md``: accuracy mean and standard deviation over the seeds, bytes, whether the
point is on the Pareto front) and the plot (``frontier.png``) come from whatever the file
holds.

Spot checks: the same command with ``--flower`` (and a few ``--points`` and ``--seeds``) runs
those points through real ``flwr run`` simulations instead, into ``flower.jsonl``, and
writes ``spot_checks.md``: each beside the population's run of the same point and seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args
from pydantic import TypeAdapter

from wash_fed.config import ConfigError, ConfigValue, WashFedConfig
from wash_fed.data import DatasetNotFoundError
from wash_fed.population import run_population
from wash_fed.results import EpochResult, FinalResult, RunResult, bytes_sent
from wash_fed.training import load_test_data, load_training_data

__all__ = [
    "UNNAMED_SETTINGS",
    "Point",
    "Summary",
    "SweepRow",
    "default_points",
    "main",
    "pareto_front",
    "pick",
    "spot_check",
    "summarise",
    "sweep",
]


Overrides = Mapping[str, ConfigValue]
"""Run configuration keys (kebab-case) and their values."""

UNNAMED_SETTINGS: dict[str, ConfigValue] = {
    "layer-schedule": "linear",
    "wire-dtype": "float32",
    "final-dtype": "float32",
}
"""What a point's name leaves unsaid: the linear layer schedule and float32 values, whatever
the app's defaults are (a name says ``constant`` or ``fp16`` where a point differs), so
rows measured under earlier defaults keep their meaning. ``--set`` overrides them."""


@dataclass(frozen=True)
class Point:
    """One operating point: a name and the run configuration it overrides."""

    name: str
    overrides: Overrides


def default_points(total_steps: int) -> list[Point]:
    """FedAvg with 1, 3, 10 and 30 rounds; WASH at three shuffle probabilities with 30
    rounds and one with 10; PAPA every round and every 5 of 30; WASH (p = 0.05, 30 rounds)
    with bfloat16 and float16 values on the wire; FedAvg (every round count) with float16,
    int8 and int4 models on the wire; WASH with the constant layer schedule (p = 0.05 and
    0.2, 30 rounds) in float32 and with float16, int8 and int4 in training and in the final
    step, and with the same three formats over 10 rounds; independent members. Every point takes
    ``total_steps`` local steps per member."""

    def rounds(count: int) -> dict[str, ConfigValue]:
        return {"num-server-rounds": count, "local-steps": max(1, total_steps // count)}

    fedavg = [Point(f"fedavg-r{r}", {"strategy": "fedavg", **rounds(r)}) for r in (1, 3, 10, 30)]
    wash = [
        Point(f"wash-p{p:g}-r{r}", {"strategy": "wash", "shuffle-prob": p, **rounds(r)})
        for p, r in ((0.005, 30), (0.05, 30), (0.2, 30), (0.05, 10))
    ]
    papa = [
        Point(f"papa-every{t}-r30", {"strategy": "papa", "papa-every": t, **rounds(30)})
        for t in (1, 5)
    ]
    compact = [
        Point(f"wash-p0.05-r30-{short}", {**wash[1].overrides, "wire-dtype": dtype})
        for short, dtype in (("bf16", "bfloat16"), ("fp16", "float16"))
    ]
    precisions = (("fp16", "float16"), ("int8", "int8"), ("int4", "int4"))
    compact += [
        Point(f"{point.name}-{short}", {**point.overrides, "wire-dtype": dtype})
        for point in fedavg
        for short, dtype in precisions
    ]
    both_ways: list[tuple[str, dict[str, ConfigValue]]] = [
        (f"-{short}", {"wire-dtype": dtype, "final-dtype": dtype}) for short, dtype in precisions
    ]
    constant = [
        Point(
            f"wash-p{p:g}-r{r}-constant{suffix}",
            {**rounds(r), "strategy": "wash", "shuffle-prob": p, "layer-schedule": "constant"}
            | dtypes,
        )
        for r, formats in ((30, (("", {}), *both_ways)), (10, both_ways))
        for p in (0.05, 0.2)
        for suffix, dtypes in formats
    ]
    ensemble = Point("ensemble", {"strategy": "ensemble", **rounds(1)})
    return [*fedavg, *wash, *papa, *compact, *constant, ensemble]


def pick(points: Sequence[Point], names: str) -> list[Point]:
    """The points named in ``names`` (comma-separated), in their own order; all of them
    when ``names`` is empty. An unknown name is a ValueError naming it."""
    if not names:
        return list(points)
    wanted = names.split(",")
    unknown = sorted(set(wanted) - {p.name for p in points})
    if unknown:
        raise ValueError(f"unknown {unknown}; choose from {[p.name for p in points]}")
    return [p for p in points if p.name in wanted]


Train = Callable[[Overrides], RunResult]
"""Trains one run configuration to the end; returns its results."""


def on_population(progress_eval: bool = False, log: Callable[[str], None] = print) -> Train:
    """Runs on the population trainer. ``progress_eval``: evaluate members and their soup on
    the test set after every epoch (the results' ``epochs``) and log each epoch's line."""

    def train(values: Overrides) -> RunResult:
        cfg = WashFedConfig.from_mapping(values)
        data, test = load_training_data(cfg), load_test_data(cfg)
        quiet: Callable[[str], None] = lambda _: None  # noqa: E731
        return run_population(
            cfg,
            data=data,
            test=test,
            log=log if progress_eval else quiet,
            progress_eval=progress_eval,
        ).results

    return train


def on_flower(output_dir: Path, federation_config: str) -> Train:
    """Runs through ``flwr run`` on Flower's local simulation (``federation_config``: its
    options, e.g. ``num-supernodes=4``); run folders under ``output_dir``."""

    from deploy.flwr_cli import run_config_arg
    from simulations.compare import run_strategy

    def train(values: Overrides) -> RunResult:
        rest = {k: v for k, v in values.items() if k != "strategy"}
        return run_strategy(
            str(values["strategy"]),
            run_config=run_config_arg(rest),
            federation_config=federation_config,
            superlink=None,
            output_dir=output_dir,
        ).result

    return train


def sweep(
    points: Sequence[Point],
    seeds: Sequence[int],
    base: Overrides,
    store: Path,
    train: Train | None = None,
    log: Callable[[str], None] = print,
) -> list[SweepRow]:
    """Run every (point, seed) not yet in ``store`` (JSON lines) with ``train`` (default: the
    population trainer), appending each result as it finishes; returns every row the store
    then holds for these points and seeds."""
    train = train or on_population()
    done = {(r.point, r.seed) for r in read_rows(store)}
    # Seed by seed: a sweep stopped early holds every point for its first seeds.
    todo = [(p, s) for s in seeds for p in points if (p.name, s) not in done]
    log(f"{len(done)} runs in {store}; {len(todo)} to go")
    for index, (point, seed) in enumerate(todo, 1):
        started = time.perf_counter()
        results = train({**base, **point.overrides, "seed": seed})
        row = SweepRow.of(point, seed, results, time.perf_counter() - started, base)
        with store.open("a") as sink:
            sink.write(_ROW.dump_json(row).decode() + "\n")
        log(
            f"[{index}/{len(todo)}] {point.name} seed {seed}: accuracy {row.accuracy:.4f}, "
            f"{row.megabytes():.2f} MB, {row.seconds:.0f} s"
        )
    wanted = {(p.name, s) for p in points for s in seeds}
    return [r for r in read_rows(store) if (r.point, r.seed) in wanted]


@dataclass(frozen=True)
class SweepRow:
    """One finished run of a sweep, as its store keeps it (a line of JSON)."""

    point: str
    seed: int
    strategy: str
    overrides: dict[str, ConfigValue]
    """The point's overrides (the sweep's base and the seed aside)."""
    final: FinalResult
    epochs: list[EpochResult]
    """The population trainer's progress by epoch (none for a Flower run)."""
    sent: dict[str, int]
    """The run's byte totals (:meth:`wash_fed.ledger.Ledger.summary`)."""
    seconds: float
    device: str = ""
    """The population trainer's device and torch threads (a Flower run: none)."""
    threads: int = 0
    base: dict[str, ConfigValue] = field(default_factory=dict)
    """The sweep's base (partition, members, the unnamed settings and ``--set``); empty in
    rows stored before it was kept."""

    @classmethod
    def of(
        cls, point: Point, seed: int, results: RunResult, seconds: float, base: Overrides
    ) -> SweepRow:
        return cls(
            point=point.name,
            seed=seed,
            strategy=results.strategy,
            overrides=dict(point.overrides),
            final=results.final_figures(),
            epochs=results.epochs,
            sent=results.bytes,
            seconds=seconds,
            device=results.device,
            threads=results.threads,
            base=dict(base),
        )

    @property
    def settings(self) -> dict[str, ConfigValue]:
        """The run's configuration, the seed aside: the base and the point's overrides."""
        return {**self.base, **self.overrides}

    @property
    def accuracy(self) -> float:
        """The final model's test accuracy."""
        return self.final.final_accuracy

    def megabytes(self, *phases: str) -> float:
        """Megabytes sent both ways, in ``phases`` (all phases when none is given)."""
        return bytes_sent(self.sent, None, *phases) / 1e6


_ROW = TypeAdapter(SweepRow)


def read_rows(store: Path) -> list[SweepRow]:
    """The rows of a JSON-lines store (none if it does not exist yet)."""
    if not store.exists():
        return []
    lines = store.read_text().splitlines()
    return [_ROW.validate_json(line) for line in lines if line.strip()]


@dataclass(frozen=True)
class Summary:
    """One point over its seeds."""

    point: str
    strategy: str
    seeds: int
    accuracy: float
    """Mean final accuracy over the seeds."""
    spread: float
    """Standard deviation of the final accuracy over the seeds (0 for one seed)."""
    megabytes: float
    """Mean bytes sent, all phases, in MB."""
    member_mean: float | None
    ensemble: float | None


def summarise(rows: Iterable[SweepRow]) -> list[Summary]:
    """Each point's mean and spread over its seeds, in order of bytes."""
    by_point: dict[str, list[SweepRow]] = {}
    for row in rows:
        by_point.setdefault(row.point, []).append(row)

    def mean_of(values: Iterable[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    summaries = []
    for point, group in by_point.items():
        accuracies = [r.accuracy for r in group]
        summaries.append(
            Summary(
                point=point,
                strategy=group[0].strategy,
                seeds=len(group),
                accuracy=statistics.fmean(accuracies),
                spread=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                megabytes=statistics.fmean(r.megabytes() for r in group),
                member_mean=mean_of(r.final.member_mean for r in group),
                ensemble=mean_of(r.final.ensemble for r in group),
            )
        )
    return sorted(summaries, key=lambda s: (s.megabytes, -s.accuracy))


def pareto_front(summaries: Sequence[Summary]) -> list[Summary]:
    """The points no other point beats on both counts (as many or fewer bytes and a higher
    mean accuracy, or fewer bytes and as high an accuracy), in order of bytes."""
    front: list[Summary] = []
    for s in sorted(summaries, key=lambda s: (s.megabytes, -s.accuracy)):
        if not front or s.accuracy > front[-1].accuracy:
            front.append(s)
    return front


def table(summaries: Sequence[Summary]) -> str:
    """Markdown: one row per point, in order of bytes; front points in bold."""
    front = {s.point for s in pareto_front(summaries)}

    def maybe(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        "| point | seeds | final accuracy (mean ± std) | members | ensemble | sent (MB) | front |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        on_front = "yes" if s.point in front else ""
        name = f"**{s.point}**" if on_front else s.point
        lines.append(
            f"| {name} | {s.seeds} | {s.accuracy:.4f} ± {s.spread:.4f} | {maybe(s.member_mean)} "
            f"| {maybe(s.ensemble)} | {s.megabytes:.2f} | {on_front} |"
        )
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[Summary], path: Path, title: str) -> Path:
    """Accuracy against bytes (log scale), one marker per point with its spread, the front
    drawn through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    labels = []
    for strategy in dict.fromkeys(s.strategy for s in summaries):
        mine = [s for s in summaries if s.strategy == strategy]
        ax.errorbar(
            [s.megabytes for s in mine],
            [s.accuracy for s in mine],
            yerr=[s.spread for s in mine],
            marker="o",
            linestyle="none",
            capsize=3,
            label=strategy,
        )
        labels += [
            ax.annotate(
                s.point,
                (s.megabytes, s.accuracy),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5},
            )
            for s in mine
        ]
    front = pareto_front(summaries)
    ax.plot(
        [s.megabytes for s in front],
        [s.accuracy for s in front],
        color="black",
        linewidth=1,
        linestyle="--",
        label="Pareto front",
    )
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent, all phases (MB, log scale)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _separate(labels)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _separate(labels: Sequence[Any]) -> None:
    """Move point labels down, one line at a time (at most ten), until none overlaps one
    placed before it: points close in bytes and accuracy otherwise print their names over
    each other. A thin line leads from a moved label to its point."""
    from matplotlib.text import Text

    placed: list[Any] = []
    for label in labels:
        for _ in range(10):
            box = Text.get_window_extent(label)  # the text alone, not its leader line
            if not any(box.overlaps(other) for other in placed):
                break
            x, y = label.xyann
            label.xyann = (x, y - 6)
        placed.append(Text.get_window_extent(label))


def spot_check(points: Sequence[Point], seeds: Sequence[int], base: Overrides, out: Path) -> int:
    """Run ``points`` x ``seeds`` through Flower's simulation (one SuperNode per member) into
    ``out/flower.jsonl`` and write ``spot_checks.md`` beside the population's rows; 1 when
    a Flower run failed."""
    from simulations.compare import RunFailedError

    federation = f"num-supernodes={base['num-members']} client-resources-num-cpus=1"
    # Flower's members evaluate every few rounds by default; the population's do not.
    flower = on_flower(out / "flower-runs", federation)
    try:
        rows = sweep(points, seeds, {**base, "eval-every": 0}, out / "flower.jsonl", flower)
    except RunFailedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = spot_check_table(read_rows(out / "runs.jsonl"), rows)
    (out / "spot_checks.md").write_text(text)
    print(f"\n{text}\nwritten: {out / 'spot_checks.md'}")
    return 0


def spot_check_table(population: Iterable[SweepRow], flower: Iterable[SweepRow]) -> str:
    """Markdown: each Flower run beside the population trainer's run of the same point and
    seed (``-`` where the population has none yet): final accuracy, and megabytes while
    training and in the final step (collection, BatchNorm statistics), which both count;
    Flower's run also sends setup and end messages and the final model to every member for
    evaluation on its own data, which the population trainer does not."""
    by_key = {(r.point, r.seed): r for r in population}
    lines = [
        "| point | seed | accuracy: population, Flower | training (MB): population, Flower "
        "| final step (MB): population, Flower | Flower only: setup, evaluation, end (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for f in flower:
        p = by_key.get((f.point, f.seed))
        # The population's ledger holds training and the final step only.
        population_cells = (
            (
                f"{p.accuracy:.4f}",
                f"{p.megabytes('train'):.3f}",
                f"{p.megabytes() - p.megabytes('train'):.3f}",
            )
            if p
            else ("-", "-", "-")
        )
        flower_cells = (
            f"{f.accuracy:.4f}",
            f"{f.megabytes('train'):.3f}",
            f"{f.megabytes('collect', 'bn'):.3f}",
        )
        pairs = " | ".join(f"{a}, {b}" for a, b in zip(population_cells, flower_cells, strict=True))
        lines.append(
            f"| {f.point} | {f.seed} | {pairs} | {f.megabytes('setup', 'evaluate', 'end'):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.frontier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--partition", default="full", help="full, iid or dirichlet")
    parser.add_argument("--alpha", type=float, default=0.3, help="dirichlet concentration")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--total-steps", type=int, default=900, help="local steps per member")
    parser.add_argument("--points", default="", help="only these points (comma-separated)")
    parser.add_argument("--set", default="", help="more overrides for every run: 'k=v ...'")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/frontier-<partition>")
    parser.add_argument(
        "--flower",
        action="store_true",
        help="spot checks: run the points through `flwr run` simulations instead (flower.jsonl) "
        "and compare them with the population trainer's rows",
    )
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / f"frontier-{args.partition}"
    try:
        points = pick(default_points(args.total_steps), args.points)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base: dict[str, ConfigValue] = {
        "partition": args.partition,
        "dirichlet-alpha": args.alpha,
        "num-members": 4,
        **UNNAMED_SETTINGS,
        **(parse_config_args([args.set]) if args.set.strip() else {}),
    }
    try:
        checked = [WashFedConfig.from_mapping({**base, **p.overrides}) for p in points]
        out.mkdir(parents=True, exist_ok=True)
        seeds = [int(s) for s in args.seeds.split(",")]
        if args.flower:
            return spot_check(points, seeds, base, out)
        rows = sweep(points, seeds, base, out / "runs.jsonl")
    except (ConfigError, DatasetNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summaries = summarise(rows)
    text = table(summaries)
    (out / "frontier.md").write_text(text)
    alpha = f", alpha {args.alpha:g}" if args.partition == "dirichlet" else ""
    title = (
        f"{checked[0].data.dataset}, {args.partition}{alpha}, {args.total_steps} steps per member"
    )
    plot(summaries, out / "frontier.png", title)
    print(f"\n{text}\nwritten: {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
