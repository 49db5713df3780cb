"""Three independent counts of the bytes of one run of each strategy, side by side.

* the run's ledger (``ledger.csv``: the size of every message as Flower serializes it);
* Prometheus (a real ``prometheus`` scraping the ServerApp's ``wash_fed_bytes_total``);
* Flower's own ``network-traffic`` from ``flwr ls --format json`` (Fleet API payloads as the
  SuperLink saw them: message and object requests and responses).

It runs a real local deployment (SuperLink and SuperNodes on loopback, TLS) with Debian's
``prometheus`` on loopback.

    python benchmarks/bytes_crosscheck.py [--strategies wash,fedavg,papa,ensemble] [--plot PNG]

``--plot`` renders the Grafana dashboard's panels from the same Prometheus, over the runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from deploy.flwr_cli import PROJECT
from deploy.processes import TINY_RUN, FlowerHarness, free_port
from deploy.promql import LocalPrometheus
from wash_fed.config import ConfigValue
from wash_fed.ledger import Ledger

MEMBERS = 4
LEGEND_FIELD = re.compile(r"\{\{(\w+)\}\}")  # Grafana's {{label}} in legend formats


def _legend(template: str, labels: dict[str, str]) -> str:
    return LEGEND_FIELD.sub(lambda m: labels.get(m.group(1), ""), template)


def render_dashboard(prometheus: LocalPrometheus, start: float, end: float, path: Path) -> None:
    """Each panel of deploy/grafana/dashboards/wash-fed.json, drawn from Prometheus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads((PROJECT / "deploy/grafana/dashboards/wash-fed.json").read_text())
    panels = dashboard["panels"]
    fig, axes = plt.subplots(
        (len(panels) + 1) // 2, 2, figsize=(13, 3.2 * ((len(panels) + 1) // 2))
    )
    tab20 = matplotlib.colormaps["tab20"]
    colours = [tab20(i) for i in range(tab20.N)]  # 20 distinct: a panel's series never share one
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_prop_cycle(color=colours)
        for target in panel["targets"]:
            for series in prometheus.query_range(target["expr"], start, end, step=2):
                legend = _legend(target["legendFormat"], series.labels)
                times = [(t - start) / 60 for t, _ in series.points]
                ax.plot(times, [v for _, v in series.points], label=legend, linewidth=1.2)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("minutes", fontsize=8)
        if panel["fieldConfig"]["defaults"]["unit"] == "decbytes":
            ax.set_yscale("log")
        ax.legend(fontsize=6, loc="best")
        ax.grid(True, alpha=0.3)
    for unused in axes.flat[len(panels) :]:
        unused.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"dashboard panels rendered to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", default="wash,fedavg,papa,ensemble")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=None, help="render the dashboard to this PNG")
    args = parser.parse_args()
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        certificates = home / "certs"
        subprocess.run(
            ["bash", str(PROJECT / "deploy/certs/generate.sh"), str(certificates)],
            check=True,
            capture_output=True,
        )
        metrics_port = free_port()
        prometheus = LocalPrometheus(home / "prometheus-data", metrics_port)
        harness = FlowerHarness(home / "flower")
        try:
            harness.start_superlink(simulation=False, certificates=certificates)
            harness.start_supernodes(MEMBERS)
            for strategy in args.strategies.split(","):
                config: dict[str, ConfigValue] = {
                    **TINY_RUN,
                    "strategy": strategy,
                    "num-members": MEMBERS,
                    "num-server-rounds": args.rounds,
                    "metrics-port": metrics_port,
                    "metrics-grace": 4.0,
                    "output-dir": str(home / "runs"),
                }
                result = harness.run(config, timeout=1800)
                if result.status != "finished:completed":
                    raise RuntimeError(f"{strategy}: {result.details}\n{harness.describe()}")
                (run_dir,) = (home / "runs").glob(f"*-{result.run_id}")
                ledger = Ledger.read_csv(run_dir / "ledger.csv")
                scraped = {
                    d: prometheus.query(
                        f'sum(max_over_time(wash_fed_bytes_total{{strategy="{strategy}",'
                        f'direction="{d}"}}[30m]))'
                    )
                    for d in ("up", "down")
                }
                rows.append(
                    (
                        strategy,
                        ledger.total("up"),
                        scraped["up"][0].value if scraped["up"] else float("nan"),
                        result.inbound_bytes,
                        ledger.total("down"),
                        scraped["down"][0].value if scraped["down"] else float("nan"),
                        result.outbound_bytes,
                    )
                )
            if args.plot:
                render_dashboard(prometheus, started, time.time(), args.plot)
        finally:
            harness.close()
            prometheus.close()
    print(f"\n{MEMBERS} SuperNodes on loopback over TLS, {args.rounds} rounds; bytes")
    print(
        "| strategy | up: ledger | up: Prometheus | up: Flower inbound | down: ledger "
        "| down: Prometheus | down: Flower outbound | Flower / ledger (up, down) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for strategy, lu, pu, fu, ld, pd, fd in rows:
        print(
            f"| {strategy} | {lu:,} | {pu:,.0f} | {fu:,} | {ld:,} | {pd:,.0f} | {fd:,} | "
            f"{fu / lu:.4f}, {fd / ld:.4f} |"
        )


if __name__ == "__main__":
    main()
