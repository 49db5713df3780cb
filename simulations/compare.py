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
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.launch import check_run_config, launch
from wash_fed.config import ConfigError


class RunFailedError(RuntimeError):
    """A compared run did not finish completed."""


def run_strategy(
    strategy: str,
    *,
    run_config: str,
    federation_config: str,
    superlink: str | None,
    output_dir: Path,
) -> dict[str, Any]:
    """One ``flwr run`` to the end; its results.json (with the wall time added). Raises
    RunFailedError when the run did not finish completed."""
    overrides = f'strategy="{strategy}" output-dir="{output_dir}" {run_config}'.strip()
    print(f"\n=== {strategy}: --run-config {overrides}", flush=True)
    started = time.perf_counter()
    ended = launch(connection=superlink, run_config=overrides, federation_config=federation_config)
    wall = time.perf_counter() - started
    if not ended.completed:
        raise RunFailedError(f"run {ended.run_id} ({strategy}) {ended.status}: {ended.details}")
    matches = list(output_dir.glob(f"*-{ended.run_id}/results.json"))
    if not matches:
        raise RunFailedError(f"run {ended.run_id} ({strategy}) left no results in {output_dir}")
    results: dict[str, Any] = json.loads(matches[0].read_text())
    results["wall_seconds_flwr_run"] = wall
    return results


def comparison_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per run, bytes next to FedAvg's for the same rounds."""
    fedavg = next((r for r in runs if r["strategy"] == "fedavg"), None)
    reference = fedavg["bytes"]["total"] if fedavg else None
    lines = [
        "| strategy | final model | accuracy | members (mean) | ensemble | sent, training (MB) "
        "| sent, total (MB) | total / FedAvg's | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        final, b = r["final"], r["bytes"]
        train = b.get("up.train", 0) + b.get("down.train", 0)
        ratio = f"{b['total'] / reference:.3f}" if reference else "-"
        member_mean = f"{final['member_mean']:.4f}" if "member_mean" in final else "-"
        ensemble = f"{final['ensemble']:.4f}" if final.get("ensemble") is not None else "-"
        lines.append(
            f"| {r['label']} | {final.get('final_soup', 'global model')} | "
            f"{final['final_accuracy']:.4f} | {member_mean} | {ensemble} | {train / 1e6:.3f} | "
            f"{b['total'] / 1e6:.3f} | {ratio} | {r['wall_seconds_flwr_run']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, x_of in (("accuracy_vs_bytes", "bytes_total"), ("accuracy_vs_round", "round")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            points = [
                (row[x_of], row["test_accuracy"])
                for row in r["rounds"]
                if row["test_accuracy"] is not None
            ]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=r["label"])
            final_x = r["bytes"]["total"] if x_of == "bytes_total" else xs[-1]
            ax.plot(
                [final_x],
                [r["final"]["final_accuracy"]],
                marker="*",
                markersize=12,
                color=line.get_color(),
            )
        if x_of == "bytes_total":
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
    (out / "runs.json").write_text(json.dumps(runs, indent=2))
    paths = plot(runs, out)
    print(f"\n{table}\nwritten: {out / 'comparison.md'}, " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
