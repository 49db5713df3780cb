"""The compose deployment for real: the images built from the real Dockerfile (stand-ins for
base images only where no registry answers), `docker-compose.yml` brought up by the same
command a user runs (`make compose-up`: deploy/roles.py all-in-one), and through it:

- WASH, then FedAvg, `flwr run . wash-fed-compose` to `finished:completed` with finite
  final models; the stack's own Prometheus holds both strategies' byte counters (pushed
  through its Pushgateway) and the docs' PromQL ratio equals the ledger's;
- what is closed, probed from a container of the test's own on the fleet network (where a
  stranger would sit): the Control and Runtime APIs answer 404 on the fleet port, nothing
  answers on the control port or Prometheus, the SuperLink does not resolve, an
  unregistered SuperNode is refused; private keys are mode 600, owned by the image's user.

One test, since one stack serves every step (the test processes share no stack); the
project is taken down (containers, networks, volumes) whatever happens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.engine import APP_IMAGE, TEST_STACKS
from deploy.flwr_cli import PROJECT, Submission
from deploy.processes import TINY_RUN
from deploy.promql import PrometheusApi
from deploy.roles import all_in_one_running
from deploy.stack import CERTS, PROMETHEUS_URL, Stack
from wash_fed.config import ConfigValue
from wash_fed.ledger import Ledger
from wash_fed.results import RunResult, read_results

pytestmark = [pytest.mark.slow, pytest.mark.compose]

PROJECT_NAME = f"{TEST_STACKS}-compose"
RUNS = "/app/runs"
MEMBERS = 3
"""Not the default four: the all-in-one takes its member count from the command."""
RUN: dict[str, ConfigValue] = {
    **TINY_RUN,
    "num-members": MEMBERS,
    "output-dir": RUNS,
    "round-timeout": 120,
    "metrics-pushgateway": "pushgateway:9091",
}
IMAGE_UID = 49999
"""The Dockerfile's user, who owns the private keys mounted into the containers."""
PROMQL_RATIO = (
    'sum by (strategy) (wash_fed_bytes_total{phase="train"})\n'
    "  / sum by (strategy) (wash_fed_fedavg_equivalent_bytes_total)"
)
"""The ratio docs/metrics.md gives (checked against it below)."""


def engine_can_be_had() -> str | None:
    """Why no container engine can run this test here (None: one can)."""
    if sys.platform != "linux":
        return "containers are tested on Linux"
    if shutil.which("docker") or shutil.which("podman") or os.geteuid() == 0:
        return None
    return "no docker or podman, and not root to install podman"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, one_stack_at_a_time: None) -> Iterator[Stack]:
    why = engine_can_be_had()
    if why is not None:
        pytest.skip(why)
    with all_in_one_running(MEMBERS, PROJECT_NAME, tmp_path_factory.mktemp("flwr-home")) as up:
        yield up


def finished(stack: Stack, submission: Submission, out: Path) -> RunResult:
    """A submitted run, waited for: completed, its folder copied to ``out``; its results."""
    run = stack.finish(submission, timeout=1200)
    assert run.status == "finished:completed", f"{run.status}\n{run.output[-4000:]}"
    return read_results(stack.fetch_run(RUNS, run.run_id, out))


def prometheus(query: str) -> dict[str, float]:
    """An instant query of the stack's Prometheus, by strategy."""
    samples = PrometheusApi(PROMETHEUS_URL).query(query)
    return {sample.labels.get("strategy", ""): sample.value for sample in samples}


def assert_finite_final(results: RunResult) -> None:
    final = results.final_figures()
    assert results.status == "completed" and math.isfinite(final.final_accuracy)
    assert 0.0 < final.final_accuracy <= 1.0, final


def check_wash_then_fedavg(stack: Stack, out: Path) -> None:
    ratios = {}
    for strategy in ("wash", "fedavg"):
        results = finished(stack, stack.submit({**RUN, "strategy": strategy}), out / strategy)
        assert_finite_final(results)
        ledger = Ledger.read_csv(out / strategy / "ledger.csv")
        sent = ledger.total(phase="train")  # FedAvg's equivalent is FedAvg's own traffic
        ratios[strategy] = sent / (results.fedavg_bytes or sent)
    docs = (PROJECT / "docs" / "metrics.md").read_text()
    assert PROMQL_RATIO in docs, "the docs' ratio query changed: update this test"
    deadline = time.monotonic() + 60  # a scrape interval or two after the push
    while (scraped := prometheus(PROMQL_RATIO)).keys() != ratios.keys():
        assert time.monotonic() < deadline, f"Prometheus has {scraped}, not both strategies"
        time.sleep(2)
    assert scraped == pytest.approx(ratios, rel=1e-12)
    assert ratios["wash"] < 0.1 and ratios["fedavg"] == 1.0


def fleet_network(stack: Stack) -> str:
    names = stack.engine.run(
        "network", "ls", "--format", "{{.Name}}",
        "--filter", f"label=com.docker.compose.project={stack.project}",
    ).stdout.split()  # fmt: skip
    (fleet,) = [n for n in names if n.endswith("_fleet")]
    return fleet


def stranger(stack: Stack, *args: str, mounts: dict[Path, str]) -> subprocess.CompletedProcess[str]:
    """A container of the test's own on the fleet network: the app image, ``args`` run."""
    volumes = [f"--volume={host}:{inside}:ro" for host, inside in mounts.items()]
    return stack.engine.run(
        "run", "--rm", f"--network={fleet_network(stack)}", *volumes, APP_IMAGE, *args,
        check=False, timeout=180,
    )  # fmt: skip


def check_what_is_closed(stack: Stack, tmp_path: Path) -> None:
    ca = {CERTS / "ca.crt": "/certs/ca.crt"}
    probe = Path(__file__).with_name("fleet_stranger.py")
    seen = stranger(stack, "python", "/probe.py", mounts={**ca, probe: "/probe.py"})
    assert seen.returncode == 0, seen.stdout + seen.stderr
    reach = json.loads(seen.stdout)
    assert reach["fleet"] not in (404, "URLError"), reach  # the Fleet API is served ...
    assert reach["control_on_fleet_port"] == reach["runtime_on_fleet_port"] == 404, reach
    assert reach["proxy_control_port_open"] is False, reach  # ... and nothing else
    resolved = {name for name, ip in reach["resolves"].items() if ip is not None}
    assert resolved == {"proxy"}, reach
    assert not any(reach["host_loopback_ports_open"].values()), reach

    key = tmp_path / "stranger.key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                   check=True)  # fmt: skip
    os.chown(key, IMAGE_UID, -1)
    refused = stranger(
        stack,
        "flower-supernode", "--root-certificates=/certs/ca.crt",
        "--auth-supernode-private-key=/certs/node.key", "--superlink=proxy:9093",
        "--node-config", f"partition-id=1 num-partitions={MEMBERS}",
        mounts={**ca, key: "/certs/node.key"},
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "Failed to activate SuperNode" in refused.stdout + refused.stderr

    for service, key_path in [
        ("supernode-0", "/certs/node.key"),
        ("superlink", "/certs/server.key"),
    ]:
        mode = stack.compose("exec", "-T", service, "stat", "-c", "%a %u", key_path).stdout
        assert mode.split() == ["600", str(IMAGE_UID)], (service, mode)


def test_the_compose_stack_runs_and_stays_closed(stack: Stack, tmp_path: Path) -> None:
    check_wash_then_fedavg(stack, tmp_path)
    check_what_is_closed(stack, tmp_path)
