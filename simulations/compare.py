"""Compare strategies through real ``flwr run`` simulations on the same data, model and rounds.

Runs each strategy one after the other against a SuperLink connection (default: Flower's
local simulation), reads each run's ``results.json`` and writes, into one folder:

* ``comparison.md`` -- final accuracies, bytes, ratio to FedAvg, wall time;
* ``accuracy_vs_bytes.png`` -- test accuracy against cumulative bytes (log scale);
* ``accuracy_vs_round.png`` -- test accuracy per round.

Example (CPU, a few minutes per strategy)::

    python -m simulations.compare --strategies wash,fedavg,papa,ensemble \\
        --run-config "num-server-rounds=20 eval-every=2"

Per-round accuracy is the members' mean test accuracy (FedAvg: the global model's); the star
at the end of each curve is the final model (the soup, or FedAvg's global model) at the
run's total bytes, final step included.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.flwr_cli import FlwrError, check_run_config
from simulations.launch import launch
from wash_fed.config import ConfigError
from wash_fed.results import RESULTS, RunResult, read_results


class RunFailedError(RuntimeError):
    """A compared run did not finish completed."""


@dataclass(frozen=True)
class ComparedRun:
    """One strategy's run: its results, and how long ``flwr run`` took end to end."""

    result: RunResult
    flwr_run_seconds: float


def run_strategy(
    strategy: str,
    *,
    run_config: str,
    federation_config: str,
    superlink: str | None,
    output_dir: Path,
) -> ComparedRun:
    """One ``flwr run`` to the end; its results. Raises RunFailedError when the run did not
    finish completed."""
    overrides = f'strategy="{strategy}" output-dir="{output_dir}" {run_config}'.strip()
    print(f"\n=== {strategy}: --run-config {overrides}", flush=True)
    started = time.perf_counter()
    try:
        ended = launch(
            connection=superlink, run_config=overrides, federation_config=federation_config
        )
    except FlwrError as err:
        raise RunFailedError(f"{strategy}: {err}") from None
    wall = time.perf_counter() - started
    if not ended.completed:
        raise RunFailedError(f"run {ended.run_id} ({strategy}) {ended.status}: {ended.details}")
    matches = list(output_dir.glob(f"*-{ended.run_id}/{RESULTS}"))
    if not matches:
        raise RunFailedError(f"run {ended.run_id} ({strategy}) left no results in {output_dir}")
    return ComparedRun(read_results(matches[0]), wall)


def comparison_table(runs: Sequence[ComparedRun]) -> str:
    """Markdown: one row per run, bytes next to FedAvg's for the same rounds."""
    fedavg = next((r.result for r in runs if r.result.strategy == "fedavg"), None)
    reference = fedavg.sent() if fedavg else None
    lines = [
        "| strategy | final model | accuracy | members (mean) | ensemble | sent, training (MB) "
        "| sent, total (MB) | total / FedAvg's | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r, final = run.result, run.result.final_figures()
        ratio = f"{r.sent() / reference:.3f}" if reference else "-"
        member_mean = "-" if final.member_mean is None else f"{final.member_mean:.4f}"
        ensemble = "-" if final.ensemble is None else f"{final.ensemble:.4f}"
        lines.append(
            f"| {r.label} | {final.final_model} | {final.final_accuracy:.4f} | {member_mean} "
            f"| {ensemble} | {r.sent(phase='train') / 1e6:.3f} | {r.sent() / 1e6:.3f} | {ratio} "
            f"| {run.flwr_run_seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[RunResult], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, by_bytes in (("accuracy_vs_bytes", True), ("accuracy_vs_round", False)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            points = [
                (row.bytes_total if by_bytes else row.round, row.test_accuracy)
                for row in r.rounds
                if row.test_accuracy is not None
            ]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=r.label)
            final_x = r.sent() if by_bytes else xs[-1]
            ax.plot(
                [final_x],
                [r.final_figures().final_accuracy],
                marker="*",
                markersize=12,
                color=line.get_color(),
            )
        if by_bytes:
            ax.set_xscale("log")
            ax.set_xlabel("bytes sent, cumulative (log scale; star: final model, all phases)")
        else:
            ax.set_xlabel("round (star: final model)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", default="wash,fedavg,papa,ensemble")
    parser.add_argument(
        "--run-config", default="", help="overrides shared by every run (TOML k=v pairs)"
    )
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument(
        "--federation-config",
        default="client-resources-num-cpus=1",
        help="extra simulation options (num-supernodes is added)",
    )
    parser.add_argument(
        "--superlink", default=None, help="SuperLink connection (default: Flower's)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_config = f"num-members={args.num_supernodes} {args.run_config}".strip()
    federation = f"num-supernodes={args.num_supernodes} {args.federation_config}".strip()
    try:
        check_run_config(run_config)
        runs = [
            run_strategy(
                s,
                run_config=run_config,
                federation_config=federation,
                superlink=args.superlink,
                output_dir=out,
            )
            for s in args.strategies.split(",")
        ]
    except (ConfigError, RunFailedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    table = comparison_table(runs)
    (out / "comparison.md").write_text(table)
    paths = plot([run.result for run in runs], out)
    print(f"\n{table}\nwritten: {out / 'comparison.md'}, " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
