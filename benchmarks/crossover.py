"""Where WASH hands over a model at the target accuracy before FedAvg does: the ratio of
their times to the target (:mod:`wash_fed.crossover`) for models from the frontier's CNN to
ResNet-50's parameter count, links from 1 to 1000 Mbit/s and 4 to 64 members, one heatmap
per member count.

Inputs, all from runs:

- the frontier's store (``simulations.frontier``): each point's accuracy over its seeds and
  its bytes per member, as multiples of the frontier model's size (float32);
- ``benchmarks/time_model.py``'s results for two models (their calibration runs, on a fast
  link): a local step's compute, a round's own, the server's seconds, the hello and the
  final step, and this app's delivery (fitted over every calibration run, on the floor of
  Flower's floor app); scaled to other parameter counts by a power law through the two.

::

    .venv/bin/python benchmarks/crossover.py --frontier runs/frontier-full/runs.jsonl \\
        --calibration runs/time_model/time_model_cnn.json \\
        runs/time_model/time_model_torchvision_resnet18.json --target 0.905

writes ``docs/crossover.png`` (``--plot``) and prints the table of where WASH finishes first.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from time_model import CHECK_RUNS, CheckRun, Composition, fitted_delivery

from simulations.frontier import SweepRow, read_rows
from wash_fed.config import WashFedConfig
from wash_fed.crossover import (
    FLOAT32_BYTES,
    OperatingPoint,
    PowerLaw,
    RoundLaw,
    StrategyCosts,
    point_seconds,
    time_to_target,
)
from wash_fed.models import build_model
from wash_fed.results import RunResult
from wash_fed.time_model import Delivery, Link, MessageRound, Setting

STRATEGIES = ("wash", "fedavg")
MEMBER_COUNTS = (4, 16, 64)
RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MODELS = {"CNN": "cnn", "ResNet-18": "torchvision:resnet18", "ResNet-50": "torchvision:resnet50"}
"""The models marked on the map (Fashion-MNIST's 10 classes, one channel)."""
SIZES = 12
"""Parameter counts on the map's other axis, log-spaced from the CNN's to ResNet-50's."""


def parameters(model: str) -> int:
    return sum(p.numel() for p in build_model(model, 10, 1, (28, 28)).parameters())


def operating_points(rows: Iterable[SweepRow]) -> list[OperatingPoint]:
    """Each WASH and FedAvg point of the store, over its seeds, its bytes per member in
    sizes of its model in float32."""
    by_point: dict[str, list[SweepRow]] = defaultdict(list)
    for row in rows:
        if row.strategy in STRATEGIES:
            by_point[row.point].append(row)
    points = []
    for name, runs in sorted(by_point.items()):
        cfg = WashFedConfig.from_mapping(runs[0].settings)
        size = parameters(cfg.model.name) * FLOAT32_BYTES * cfg.num_members
        sent, rounds = runs[0].sent, cfg.num_server_rounds
        accuracies = [r.accuracy for r in runs]
        points.append(
            OperatingPoint(
                name=name,
                strategy=runs[0].strategy,
                rounds=rounds,
                local_steps=cfg.optim.local_steps,
                accuracy=statistics.fmean(accuracies),
                spread=statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                seeds=len(runs),
                down=sent.get("down.train", 0) / rounds / size,
                # The collection rides on the last training round's replies.
                up=(sent.get("up.train", 0) + sent.get("up.collect", 0)) / rounds / size,
                final=((sent["down.bn"] / size, sent["up.bn"] / size),)
                if "down.bn" in sent
                else (),
            )
        )
    return points


@dataclass(frozen=True)
class Measured:
    """What one calibration run says a strategy costs on a model of ``params`` parameters."""

    params: int
    step: float
    round_compute: float
    server: float
    setup: MessageRound
    final: list[MessageRound]
    outside: float

    @classmethod
    def of(cls, run: RunResult) -> Measured:
        composition = Composition.of(run)
        steps = run.config.optim.local_steps
        trained = [
            statistics.fmean(
                float(m["train-seconds"]) / float(m["steps"]) for m in r.members.values()
            )
            for r in run.rounds
        ]
        step = statistics.fmean(trained)
        compute = statistics.fmean(r.compute for r in composition.training)
        return cls(
            params=parameters(run.config.model.name),
            step=step,
            round_compute=max(compute - step * steps, 0.0),
            server=statistics.fmean(r.server for r in composition.training),
            setup=composition.setup[0],
            final=composition.final,
            outside=composition.outside,
        )


def law(pairs: Sequence[tuple[float, float]]) -> PowerLaw:
    return PowerLaw.through(pairs[0], pairs[1])


def round_law(a: tuple[int, MessageRound], b: tuple[int, MessageRound]) -> RoundLaw:
    (pa, ra), (pb, rb) = a, b
    parts = {
        k: law([(pa, getattr(ra, k)), (pb, getattr(rb, k))])
        for k in ("compute", "server", "down", "up")
    }
    return RoundLaw(**parts)


def step_law(runs: Sequence[CheckRun]) -> PowerLaw:
    """A local step's compute through the two models, each the mean of both strategies'
    calibration runs: members train alike whatever the strategy, so the runs measure one
    cost twice (on cnn-wide 16% apart, their mean within 1% of a later run's steps)."""
    steps: dict[int, list[float]] = {}
    for run in runs:
        measured = Measured.of(run.calibration)
        steps.setdefault(measured.params, []).append(measured.step)
    return law([(params, statistics.fmean(seconds)) for params, seconds in steps.items()])


def strategy_costs(runs: Sequence[CheckRun], strategy: str, step: PowerLaw) -> StrategyCosts:
    """``strategy``'s costs through its calibration runs of two models, a local step's
    compute ``step`` (every strategy's: :func:`step_law`)."""
    first, second = (Measured.of(r.calibration) for r in runs if r.strategy == strategy)
    pair = ((first.params, first), (second.params, second))

    def through(field: str) -> PowerLaw:
        return law([(p, getattr(m, field)) for p, m in pair])

    return StrategyCosts(
        members=runs[0].members,
        step=step,
        round_compute=through("round_compute"),
        server=through("server"),
        setup=round_law((first.params, first.setup), (second.params, second.setup)),
        final=tuple(
            round_law((first.params, f1), (second.params, f2))
            for f1, f2 in zip(first.final, second.final, strict=True)
        ),
        outside=through("outside"),
    )


def computing_faster(costs: StrategyCosts, factor: float) -> StrategyCosts:
    """``costs`` with every part of the members' compute ``factor`` times shorter (another
    device than the calibration runs'): local steps, a round's own, the hello's and the
    final step's handling."""

    def faster(law: PowerLaw) -> PowerLaw:
        return dataclasses.replace(law, at_reference=law.at_reference / factor)

    def round_faster(law: RoundLaw) -> RoundLaw:
        return dataclasses.replace(law, compute=faster(law.compute))

    return dataclasses.replace(
        costs,
        step=faster(costs.step),
        round_compute=faster(costs.round_compute),
        setup=round_faster(costs.setup),
        final=tuple(round_faster(law) for law in costs.final),
    )


def delivery(runs: Sequence[CheckRun]) -> Delivery:
    """Flower's floor (the mean of the models' floor rounds) and this app's own cost,
    fitted over every calibration run's message rounds."""
    members = runs[0].members
    floor = Delivery.calibrated(statistics.fmean(r.floor_round for r in runs), members)
    ways = [way for r in runs for way in Composition.of(r.calibration).ways]
    return fitted_delivery(ways, floor, members, Link(runs[0].calibration_mbit))


@dataclass(frozen=True)
class Cell:
    """One member count, parameter count and link rate: each strategy's time to the target
    and the point that gives it (None: none of its points reaches the target)."""

    members: int
    params: float
    mbit: float
    wash: tuple[float, OperatingPoint] | None
    fedavg: tuple[float, OperatingPoint] | None

    @property
    def ratio(self) -> float:
        """WASH's time over FedAvg's (inf: WASH never gets there; 0: FedAvg never does)."""
        if self.wash is None or self.fedavg is None:
            return (
                math.nan if self.wash is self.fedavg else (math.inf if self.wash is None else 0.0)
            )
        return self.wash[0] / self.fedavg[0]


@dataclass(frozen=True)
class Map:
    points: list[OperatingPoint]
    costs: dict[str, StrategyCosts]
    delivery: Delivery
    target: float

    def cell(self, members: int, params: float, mbit: float) -> Cell:
        setting = Setting(members, self.delivery, Link(mbit))
        times = {
            s: time_to_target(
                [p for p in self.points if p.strategy == s],
                self.costs[s],
                params,
                setting,
                self.target,
            )
            for s in STRATEGIES
        }
        return Cell(members, params, mbit, times["wash"], times["fedavg"])

    def seconds(self, name: str, members: int, params: float, mbit: float) -> float:
        """The seconds of a run of the point called ``name`` at ``mbit``, whether it reaches
        the target or not; ValueError if the map has no such point."""
        the_point = next((p for p in self.points if p.name == name), None)
        if the_point is None:
            raise ValueError(f"the frontier has no point {name}")
        setting = Setting(members, self.delivery, Link(mbit))
        return point_seconds(the_point, self.costs[the_point.strategy], params, setting)


def calibration_runs(paths: Sequence[Path]) -> list[CheckRun]:
    """The calibration runs in ``time_model.py``'s JSON files (its checked runs left out)."""
    runs = [r for path in paths for r in CHECK_RUNS.validate_json(path.read_bytes())]
    return [r for r in runs if r.calibrating]


def build_map(frontier: Path, calibration: Sequence[Path], target: float, faster: float) -> Map:
    """The map from a frontier's store and two models' calibration runs (``time_model.py``'s
    JSON), members computing ``faster`` times faster than measured; ValueError if the store
    lacks WASH or FedAvg points."""
    rows = read_rows(frontier)
    points = operating_points(rows)
    if not {p.strategy for p in points} >= set(STRATEGIES):
        raise ValueError(f"{frontier} needs WASH and FedAvg points")
    runs = calibration_runs(calibration)
    trained = {WashFedConfig.from_mapping(r.settings).optim.batch_size for r in rows}
    timed = {r.calibration.config.optim.batch_size for r in runs}
    if trained != timed or len(timed) != 1:
        raise ValueError(
            f"a local step's compute was timed at batch size {sorted(timed)} but the frontier's "
            f"points trained at {sorted(trained)}: calibrate with --run-config 'batch-size=...'"
        )
    step = step_law(runs)
    costs = {s: computing_faster(strategy_costs(runs, s, step), faster) for s in STRATEGIES}
    return Map(points, costs, delivery(runs), target)


def sizes(smallest: int, largest: int) -> list[float]:
    step = math.log(largest / smallest) / (SIZES - 1)
    return [smallest * math.exp(step * i) for i in range(SIZES)]


def plot(
    the_map: Map, params: Sequence[float], marked: dict[str, int], path: Path, compute: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        1, len(MEMBER_COUNTS), figsize=(15, 4.6), sharey=True, layout="constrained"
    )
    norm = matplotlib.colors.TwoSlopeNorm(vmin=-2.0, vcenter=0.0, vmax=2.0)
    for ax, members in zip(axes, MEMBER_COUNTS, strict=True):
        grid = np.array([[the_map.cell(members, p, r).ratio for r in RATES] for p in params])
        shown = np.clip(np.log2(grid), -2.0, 2.0)
        mesh = ax.pcolormesh(RATES, params, shown, cmap="RdBu_r", norm=norm, shading="nearest")
        ax.contour(RATES, params, np.log2(grid), levels=[0.0], colors="black", linewidths=1.5)
        for name, count in marked.items():
            ax.axhline(count, color="grey", linewidth=0.6, linestyle=":")
            ax.annotate(name, (RATES[-1], count), fontsize=8, ha="right", va="bottom")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="each member's link (Mbit/s)",
            title=f"{members} members",
        )
    axes[0].set_ylabel("parameters")
    bar = fig.colorbar(mesh, ax=axes, label="WASH time / FedAvg time to the target (log2)")
    bar.set_ticks([-2, -1, 0, 1, 2], labels=["1/4", "1/2", "1", "2", "4"])
    fig.suptitle(
        f"Time to {the_map.target:.3f} test accuracy with the model each hands over, "
        f"members' compute {compute} (blue: WASH first; black line: equal)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ratio(value: float) -> str:
    return "never" if math.isinf(value) else ("-" if math.isnan(value) else f"{value:.2f}")


def table(the_map: Map, marked: dict[str, int]) -> str:
    shown = (1, 10, 100, 1000)
    lines = [
        "| members | model (parameters) | "
        + " | ".join(f"WASH/FedAvg at {r} Mbit/s" for r in shown)
        + " | WASH first up to (Mbit/s) | points at 10 Mbit/s (WASH; FedAvg) |",
        "|---|---|" + "---|" * (len(shown) + 2),
    ]
    for members, (name, count) in itertools.product(MEMBER_COUNTS, marked.items()):
        cells = {r: the_map.cell(members, count, r) for r in RATES}
        first = [r for r in RATES if cells[r].ratio < 1]
        picked = cells[10]
        names = "; ".join(t[1].name if t else "none" for t in (picked.wash, picked.fedavg))
        lines.append(
            f"| {members} | {name} ({count / 1e6:.2f} M) | "
            + " | ".join(_ratio(cells[r].ratio) for r in shown)
            + f" | {max(first) if first else 'never'} | {names} |"
        )
    return "\n".join(lines)


def describe(the_map: Map) -> str:
    d = the_map.delivery
    lines = [
        f"delivery: fixed {d.fixed:.2f} s, {d.per_byte * 1e6:.3f} s a MB, poll up to {d.poll:g} s",
        "points (accuracy mean ± std over seeds; per member and round, in model sizes):",
    ]
    for p in sorted(the_map.points, key=lambda p: (p.strategy, p.accuracy)):
        mark = "reaches" if p.accuracy >= the_map.target else "below"
        lines.append(
            f"  {p.name}: {p.accuracy:.4f} ± {p.spread:.4f} ({p.seeds} seeds, {mark}), "
            f"{p.rounds} rounds of {p.local_steps} steps, down {p.down:.3f} up {p.up:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frontier", type=Path, default=Path("runs/frontier-full/runs.jsonl"))
    parser.add_argument("--calibration", type=Path, nargs=2, required=True, help="two models' JSON")
    parser.add_argument("--target", type=float, default=0.905, help="test accuracy")
    parser.add_argument(
        "--faster", type=float, default=1.0, help="members compute this many times faster"
    )
    parser.add_argument("--plot", type=Path, default=Path("docs/crossover.png"))
    args = parser.parse_args(argv)
    try:
        the_map = build_map(args.frontier, args.calibration, args.target, args.faster)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    marked = {name: parameters(model) for name, model in MODELS.items()}
    params = sizes(min(marked.values()), max(marked.values()))
    print(describe(the_map))
    print(f"\n{table(the_map, marked)}\n")
    compute = "as measured" if args.faster == 1 else f"{args.faster:g}x faster than measured"
    print(f"written: {plot(the_map, params, marked, args.plot, compute)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
