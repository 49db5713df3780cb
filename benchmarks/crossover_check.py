"""The crossover map (:mod:`crossover`) against real runs: at the link rates given (pick
them on either side of where the map's ratio crosses 1; the check prints the ratio at each
before it runs), the operating points the map picks for WASH and for FedAvg, run for real
with members behind tbf-shaped links of their own (:mod:`deploy.namespaces`), each run's
time to the target with the model it hands over beside the map's prediction, and the winner
each names.

The model, its data and its training are the frontier store's (``simulations.frontier``
with ``--set model=...``): the runs train the points whose accuracy the map uses, for one
seed, evaluated and polled as the calibration runs were (:data:`TIMED`, from their
configuration). A run reaches the target if the model it hands over does (FedAvg: its last
global model; WASH: its soup after the final step); its time is its wall time. Requires
root.

    sudo .venv/bin/python benchmarks/crossover_check.py --rates 1,10 --target 0.90 \\
        --frontier runs/frontier-cnn-wide/runs.jsonl \\
        --calibration runs/time_model/time_model_cnn.json \\
        runs/time_model/time_model_torchvision_resnet18.json
    .venv/bin/python benchmarks/crossover_check.py --render runs/crossover_check/runs.json

writes ``crossover_check.md`` (printed too) and ``runs.json`` into ``--out``. ``--plan``
prints the map's picks, their predicted seconds and its ratio at each rate, and runs
nothing (no root needed): the way to find rates on either side of 1. ``--render``
with ``--frontier`` and ``--calibration`` predicts the runs again from other calibration
runs: the checked model's own, where the map's two models scale its compute wrongly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from crossover import STRATEGIES, Map, build_map, calibration_runs, parameters
from edge_time import RunNotCompletedError, deployment
from pydantic import TypeAdapter
from time_model import CheckRun

from deploy.engine import StackError
from deploy.flwr_cli import FlwrError
from deploy.namespaces import TopologyError, unwind_on_sigterm
from simulations.frontier import SweepRow, read_rows
from wash_fed.config import ConfigValue, WashFedConfig
from wash_fed.results import RunResult

TIMED = ("test-on-server", "eval-every", "test-subset", "poll-interval")
"""What the check takes from the calibration runs' configuration, so that its rounds
evaluate and poll as theirs did (and the target is judged on the test images theirs were);
the rest is the frontier point's."""


@dataclass(frozen=True)
class CheckedRun:
    """One real run of the point the map picked for ``strategy`` at ``mbit``, beside the
    map's prediction of its time."""

    mbit: float
    strategy: str
    point: str
    predicted: float
    target: float
    results: RunResult

    @property
    def accuracy(self) -> float:
        """The handed-over model's test accuracy."""
        return self.results.final_figures().final_accuracy

    @property
    def measured(self) -> float | None:
        """Seconds to the target: the run's wall time if its model reached it (None: never)."""
        return self.results.wall_seconds if self.accuracy >= self.target else None


CHECKED_RUNS = TypeAdapter(list[CheckedRun])


def picked(the_map: Map, members: int, params: float, mbit: float) -> dict[str, tuple[float, str]]:
    """Each strategy's predicted time to the target at ``mbit`` and the point that gives it;
    ValueError if a strategy has no point that reaches the target."""
    cell = the_map.cell(members, params, mbit)
    chosen = {"wash": cell.wash, "fedavg": cell.fedavg}
    missing = [s for s, pick in chosen.items() if pick is None]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} point reaches {the_map.target}")
    return {s: (pick[0], pick[1].name) for s, pick in chosen.items() if pick is not None}


def timed_as(calibration: Sequence[CheckRun]) -> dict[str, ConfigValue]:
    """The :data:`TIMED` keys of the calibration runs; ValueError if they disagree."""
    seen = [{k: r.calibration.config.to_mapping()[k] for k in TIMED} for r in calibration]
    if any(s != seen[0] for s in seen):
        raise ValueError(f"the calibration runs evaluate or poll differently: {seen}")
    return seen[0]


def require_one_base(rows: Sequence[SweepRow]) -> None:
    """ValueError unless every row keeps its sweep's base and all share one (rows stored
    before the base was kept read as the app's defaults, which are not what they ran)."""
    bases = [r.base for r in rows]
    if not all(bases) or any(b != bases[0] for b in bases):
        raise ValueError(
            "the frontier's rows must all keep one sweep's base settings; rerun the sweep "
            "into a store of its own"
        )


class TrainedModel(NamedTuple):
    """What the frontier's points trained: the model's name, its parameter count and the
    number of members."""

    name: str
    params: int
    members: int


def trained_model(rows: Sequence[SweepRow]) -> TrainedModel:
    """The frontier's model (its rows must keep one base: :func:`require_one_base`)."""
    require_one_base(rows)
    cfg = WashFedConfig.from_mapping(rows[0].settings)
    return TrainedModel(cfg.model.name, parameters(cfg.model.name), cfg.num_members)


def repredicted(
    runs: Sequence[CheckedRun], frontier: Path, calibration: Sequence[Path]
) -> list[CheckedRun]:
    """``runs``, each predicted again for the point it ran by the map drawn from
    ``frontier`` and ``calibration`` (the checked model's own calibration runs, say)."""
    if not runs:
        return []
    model = trained_model(read_rows(frontier))
    the_map = build_map(frontier, calibration, runs[0].target, 1.0)
    return [
        replace(run, predicted=the_map.seconds(run.point, model.members, model.params, run.mbit))
        for run in runs
    ]


def run_config(
    rows: Sequence[SweepRow], point: str, seed: int, timed: dict[str, ConfigValue]
) -> dict[str, ConfigValue]:
    """The frontier's configuration of ``point`` for ``seed``, timed as the calibration."""
    row = next(r for r in rows if r.point == point)
    return {**row.settings, **timed, "seed": seed}


def winner(times: dict[str, float | None]) -> str:
    """The strategy first at the target (``none``: neither reached it)."""
    reached = {s: t for s, t in times.items() if t is not None}
    return min(reached, key=lambda s: reached[s]) if reached else "none"


def table(runs: Sequence[CheckedRun]) -> str:
    """Markdown: one row per run, predicted beside measured; then each rate's winners."""
    lines = [
        "| link (Mbit/s) | strategy | point | predicted (s) | measured (s) | error "
        "| final accuracy | sent (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        measured, error = "never", "-"
        if run.measured is not None:
            measured = f"{run.measured:.0f}"
            error = f"{(run.predicted - run.measured) / run.measured:+.0%}"
        lines.append(
            f"| {run.mbit:g} | {run.strategy} | {run.point} | {run.predicted:.0f} | {measured} "
            f"| {error} | {run.accuracy:.4f} | {run.results.sent() / 1e6:.2f} |"
        )
    lines.append("")
    for mbit in dict.fromkeys(r.mbit for r in runs):
        at = {r.strategy: r for r in runs if r.mbit == mbit}
        if set(at) != set(STRATEGIES):
            lines.append(f"{mbit:g} Mbit/s: not every strategy's run completed.")
            continue
        said = winner({s: r.predicted for s, r in at.items()})
        found = winner({s: r.measured for s, r in at.items()})
        verdict = "agrees" if said == found else "DISAGREES"
        ratio = at["wash"].predicted / at["fedavg"].predicted
        lines.append(
            f"{mbit:g} Mbit/s: the map says {said} first (WASH/FedAvg {ratio:.2f}); "
            f"the runs: {found} first ({verdict})."
        )
    return "\n".join(lines) + "\n"


def planned(
    the_map: Map, model: TrainedModel, rates: Sequence[float]
) -> dict[float, dict[str, tuple[float, str]]]:
    """Each rate's picks (:func:`picked`), printed with the map's WASH/FedAvg ratio; a
    warning where the rates do not straddle 1."""
    plans = {mbit: picked(the_map, model.members, model.params, mbit) for mbit in rates}
    print(f"{model.name}, {model.members} members, target {the_map.target}:", flush=True)
    ratios = [plan["wash"][0] / plan["fedavg"][0] for plan in plans.values()]
    for (mbit, plan), ratio in zip(plans.items(), ratios, strict=True):
        picks = ", ".join(f"{point} {seconds:.0f} s" for seconds, point in plan.values())
        print(f"  {mbit:g} Mbit/s: WASH/FedAvg {ratio:.3f} ({picks})", flush=True)
    if min(ratios) >= 1 or max(ratios) < 1:
        print("warning: the rates do not straddle the map's crossover", file=sys.stderr)
    return plans


def check(
    the_map: Map,
    rows: Sequence[SweepRow],
    timed: dict[str, ConfigValue],
    rates: Sequence[float],
    seed: int,
    out: Path,
) -> list[CheckedRun]:
    """Every rate's two runs, one after the other over the same SuperNodes; a run that does
    not complete is reported and left out."""
    model = trained_model(rows)
    plans = planned(the_map, model, rates)
    runs: list[CheckedRun] = []
    with deployment("namespaces", model.members, out / "runs") as runs_on:
        for mbit, plan in plans.items():
            runs_on.shape(mbit)
            for strategy, (predicted, point) in plan.items():
                print(f"=== {mbit:g} Mbit/s, {point}: {predicted:.0f} s predicted", flush=True)
                try:
                    results = runs_on.complete(run_config(rows, point, seed, timed))
                except RunNotCompletedError as failed:
                    print(f"    {failed}", file=sys.stderr, flush=True)
                    continue
                run = CheckedRun(mbit, strategy, point, predicted, the_map.target, results)
                runs.append(run)
                print(f"    {results.wall_seconds:.0f} s, {run.accuracy:.4f}", flush=True)
                (out / "runs.json").write_bytes(CHECKED_RUNS.dump_json(runs, indent=2))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frontier", type=Path, help="the model's frontier store")
    parser.add_argument("--calibration", type=Path, nargs=2, help="two models' JSON")
    parser.add_argument("--target", type=float, default=0.90, help="test accuracy")
    parser.add_argument("--rates", default="1,10", help="link rates, Mbit/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs") / "crossover_check")
    parser.add_argument(
        "--render",
        type=Path,
        help="only write the table from this JSON (with --frontier and --calibration: "
        "its runs predicted again from those)",
    )
    parser.add_argument(
        "--plan", action="store_true", help="only print the map's picks at --rates, run nothing"
    )
    args = parser.parse_args(argv)
    if (args.frontier is None) != (args.calibration is None):
        parser.error("--frontier and --calibration go together")
    if args.plan and args.render:
        parser.error("--plan and --render are different tasks: give one")
    if not (args.render or args.frontier):
        parser.error("--frontier and --calibration are needed to plan or run the check")
    out = args.out.resolve()
    if not args.plan:
        out.mkdir(parents=True, exist_ok=True)
    try:
        if args.render:
            rendered = CHECKED_RUNS.validate_json(args.render.read_bytes())
            if args.frontier is not None:
                rendered = repredicted(rendered, args.frontier, args.calibration)
            return report(rendered, out)
        rates = list(dict.fromkeys(float(r) for r in args.rates.split(",")))
        the_map = build_map(args.frontier, args.calibration, args.target, 1.0)
        if args.plan:
            planned(the_map, trained_model(read_rows(args.frontier)), rates)
            return 0
        timed = timed_as(calibration_runs(args.calibration))
        runs = check(the_map, read_rows(args.frontier), timed, rates, args.seed, out)
    except (ValueError, TopologyError, StackError, FlwrError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(runs, out)
    return 0 if len(runs) == len(STRATEGIES) * len(rates) else 1


def report(runs: Sequence[CheckedRun], out: Path) -> int:
    """The table, printed and written to ``out``; returns 0."""
    text = table(runs)
    (out / "crossover_check.md").write_text(text)
    print(f"\n{text}\nwritten: {out / 'crossover_check.md'}")
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    sys.exit(main())
