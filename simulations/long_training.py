"""Long training in the paper's setting: four members from different initialisations, a
shuffle after every SGD step, for many epochs (15 by default). Does WASH's members recover
to the independent members' accuracy, and does its soup reach their ensemble? Variants:
independent members (the ensemble to reach), WASH at three shuffle probabilities with the
linear layer schedule and one with the constant schedule, WASH+Opt (momentum shuffled with
the weights) at the same probabilities, and PAPA every 10 steps for reference.

    python -m simulations.long_training                          # every variant, in turn
    python -m simulations.long_training --variants ensemble,wash-p0.003

Each finished variant is appended to ``<out>/runs.jsonl`` (run the same command again to
continue); the table (``long_training.md``) and the accuracy-per-epoch plot
(``long_training.png``) come from whatever the file holds. Every variant runs on the
population trainer (:mod:`wash_fed.population`), on CUDA when there is one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flwr.common.config import parse_config_args

from simulations.frontier import (
    UNNAMED_SETTINGS,
    Point,
    SweepRow,
    on_population,
    pick,
    read_rows,
    sweep,
)
from wash_fed.config import ConfigError, ConfigValue, WashFedConfig
from wash_fed.data import DatasetNotFoundError
from wash_fed.population import rounds_for_epochs
from wash_fed.training import load_training_data

__all__ = ["VARIANTS", "main", "plot", "table"]

_PROBABILITIES = (0.001, 0.003, 0.01)

VARIANTS: list[Point] = [
    Point("ensemble", {"strategy": "ensemble"}),
    *(Point(f"wash-p{p:g}", {"strategy": "wash", "shuffle-prob": p}) for p in _PROBABILITIES),
    Point(
        "wash-p0.003-constant",
        {"strategy": "wash", "shuffle-prob": 0.003, "layer-schedule": "constant"},
    ),
    *(
        Point(
            f"wash+opt-p{p:g}",
            {"strategy": "wash", "shuffle-prob": p, "shuffle-optimizer-state": True},
        )
        for p in _PROBABILITIES
    ),
    Point("papa-every10", {"strategy": "papa", "papa-every": 10, "papa-rate": 0.9}),
]


def table(rows: Sequence[SweepRow]) -> str:
    """Markdown: one row per variant, in the order given."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        "| variant | members (mean) | ensemble | uniform soup | uniform soup + BN "
        "| sent, training (MB) | sent, total (MB) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        final = row.final
        lines.append(
            f"| {row.point} | {cell(final.member_mean)} | {cell(final.ensemble)} "
            f"| {cell(final.soups.get('uniform'))} | {cell(final.soups.get('uniform+bn'))} "
            f"| {row.megabytes('train'):.2f} | {row.megabytes():.2f} | {row.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[SweepRow], path: Path, title: str) -> Path:
    """Members' mean test accuracy after every epoch (solid) and their uniform soup's
    (dashed, without BatchNorm recalibration), one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lowest = 1.0
    for index, row in enumerate(rows):
        colour = f"C{index % 10}"
        evaluated = [(e.epoch, e.member_mean, e.soup) for e in row.epochs]
        points = [(x, m, s) for x, m, s in evaluated if m is not None and s is not None]
        x, members, soups = (list(column) for column in zip(*points, strict=True))
        lowest = min([lowest, *members])
        ax.plot(x, members, color=colour, marker=".", label=f"{row.point}: members")
        if row.strategy != "ensemble":  # independent members' soup collapses
            ax.plot(x, soups, color=colour, marker=".", linestyle="--")
        if row.final.ensemble is not None and row.strategy == "ensemble":
            ax.axhline(row.final.ensemble, color=colour, linestyle=":", label="ensemble (final)")
    ax.set_ylim(max(0.0, lowest - 0.05), None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (solid: members' mean, dashed: uniform soup)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.long_training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=15, help="epochs of member 0's data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="", help="only these (comma-separated)")
    parser.add_argument("--set", default="", help="more overrides for every run: 'k=v ...'")
    parser.add_argument("--out", type=Path, default=Path("runs/long-training"))
    args = parser.parse_args(argv)
    base: dict[str, ConfigValue] = {
        "local-steps": 1,
        "init": "different",
        **UNNAMED_SETTINGS,
        **(parse_config_args([args.set]) if args.set.strip() else {}),
    }
    try:
        variants = pick(VARIANTS, args.variants)
        cfg = WashFedConfig.from_mapping(base)
        base["num-server-rounds"] = rounds_for_epochs(cfg, load_training_data(cfg), args.epochs)
        for variant in variants:
            WashFedConfig.from_mapping({**base, **variant.overrides})
        args.out.mkdir(parents=True, exist_ok=True)
        store = args.out / "runs.jsonl"
        sweep(variants, [args.seed], base, store, on_population(progress_eval=True))
    except (ConfigError, DatasetNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    order = {v.name: i for i, v in enumerate(VARIANTS)}
    rows = sorted(
        (r for r in read_rows(store) if r.seed == args.seed and r.point in order),
        key=lambda r: order[r.point],
    )
    text = table(rows)
    (args.out / "long_training.md").write_text(text)
    title = (
        f"{cfg.data.dataset}, {args.epochs} epochs, {cfg.num_members} members from different "
        "initialisations, a shuffle every step"
    )
    plot(rows, args.out / "long_training.png", title)
    print(f"\n{text}\nwritten: {args.out / 'long_training.md'}, {args.out / 'long_training.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
