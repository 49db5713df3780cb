"""Three independent counts of the bytes of one run of each strategy, side by side.

* the run's ledger (``ledger.csv``: the size of every message as Flower serializes it);
* Prometheus (a real ``prometheus`` scraping the ServerApp's ``wash_fed_bytes_total``);
* Flower's own ``network-traffic`` from ``flwr ls --format json`` (Fleet API payloads as the
  SuperLink saw them: message and object requests and responses).

It runs a real local deployment (SuperLink and SuperNodes on loopback, TLS) with Debian's
``prometheus`` on loopback.

    python benchmarks/bytes_crosscheck.py [--strategies wash,fedavg,papa,ensemble]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from simulations.local_flower import PROJECT, FlowerHarness, Prometheus, free_port
from wash_fed.ledger import Ledger

MEMBERS = 4


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", default="wash,fedavg,papa,ensemble")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        certificates = home / "certs"
        subprocess.run(
            ["bash", str(PROJECT / "deploy/certs/generate.sh"), str(certificates)],
            check=True,
            capture_output=True,
        )
        metrics_port = free_port()
        prometheus = Prometheus(home / "prometheus-data", metrics_port)
        harness = FlowerHarness(home / "flower")
        harness.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.1"
        try:
            harness.start_superlink(simulation=False, certificates=certificates)
            harness.start_supernodes(MEMBERS)
            for strategy in args.strategies.split(","):
                config: dict[str, Any] = {
                    "strategy": strategy,
                    "num-members": MEMBERS,
                    "num-server-rounds": args.rounds,
                    "local-steps": 5,
                    "batch-size": 64,
                    "train-subset": 3000,
                    "holdout-size": 300,
                    "test-subset": 500,
                    "eval-every": 0,
                    "bn-batches": 4,
                    "poll-interval": 0.2,
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
                traffic = result.listing["network-traffic"]
                rows.append(
                    (
                        strategy,
                        ledger.total("up"),
                        float(scraped["up"][0]["value"][1]) if scraped["up"] else float("nan"),
                        traffic["inbound-bytes"],
                        ledger.total("down"),
                        float(scraped["down"][0]["value"][1]) if scraped["down"] else float("nan"),
                        traffic["outbound-bytes"],
                    )
                )
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
