"""A real local deployment: `flower-superlink` and four `flower-supernode` processes on
loopback, with TLS, the topology docker-compose.yml runs in containers. WASH and FedAvg run
to completion; the ledger is checked against Flower's own traffic figures."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulations.local_flower import PROJECT, TINY_RUN, FlowerHarness
from wash_fed.ledger import Ledger

pytestmark = pytest.mark.slow

MEMBERS = 4
SMALL: dict[str, Any] = {**TINY_RUN, "num-members": MEMBERS}
# Flower's Fleet API carries, besides the objects the ledger counts, its own requests and
# responses (message protos, object trees of 64-character ids, node and run ids, heartbeats).
FRAMING_SHARE = 0.03


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerHarness]:
    home = tmp_path_factory.mktemp("deployment")
    certificates = home / "certs"
    subprocess.run(
        ["bash", str(PROJECT / "deploy/certs/generate.sh"), str(certificates)],
        check=True,
        capture_output=True,
    )
    harness = FlowerHarness(home)
    harness.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.1"
    try:
        harness.start_superlink(simulation=False, certificates=certificates)
        harness.start_supernodes(MEMBERS)
        yield harness
    finally:
        harness.close()
    assert harness.descendants() == [], "processes survived the deployment"


@pytest.mark.parametrize("strategy", ["wash", "fedavg"])
def test_deployment_over_tls_runs_and_its_ledger_matches_flowers_traffic(
    deployment: FlowerHarness, tmp_path: Path, strategy: str
) -> None:
    result = deployment.run(
        {**SMALL, "strategy": strategy, "output-dir": str(tmp_path)}, timeout=900
    )
    assert result.status == "finished:completed", f"{result.details}\n{deployment.describe()}"
    (run_dir,) = tmp_path.glob(f"*-{result.run_id}")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["answered"] for r in results["rounds"]] == [MEMBERS] * SMALL["num-server-rounds"]
    ledger = Ledger.read_csv(run_dir / "ledger.csv")
    traffic = result.listing["network-traffic"]
    # SuperLink inbound = what members sent up; outbound = what they pulled down.
    for ours, flowers in (
        (ledger.total("up"), traffic["inbound-bytes"]),
        (ledger.total("down"), traffic["outbound-bytes"]),
    ):
        assert 0 < ours <= flowers <= ours * (1 + FRAMING_SHARE), (strategy, ours, flowers)
