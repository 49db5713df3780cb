"""The compose stack's security, on real processes: a TLS SuperLink with SuperNode
authentication behind compose's own nginx proxy configuration. Registered SuperNodes join
through the proxy's fleet address and a run completes; a SuperNode whose key is not
registered is refused; the Control API answers on the control address only."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.flwr_cli import BIN, PROJECT, flwr_answer
from deploy.processes import TINY_RUN, FlowerHarness, free_port

pytestmark = pytest.mark.slow

MEMBERS = 2


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerHarness]:
    """SuperLink (TLS, SuperNode auth) behind the proxy; node keys 0..2 in ``home/nodes``,
    0 and 1 registered through the proxy's control address."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is missing (Debian package nginx-light; make test installs it)")
    home = tmp_path_factory.mktemp("secured")
    env = {**os.environ, "KEY_OWNER": str(os.getuid())}
    certs = PROJECT / "deploy" / "certs"
    subprocess.run(["bash", str(certs / "generate.sh"), str(home / "certs")], check=True, env=env)
    subprocess.run(["bash", str(certs / "node-keys.sh"), str(home / "nodes"), "3"], env=env)
    with FlowerHarness(home) as harness:
        harness.start_superlink(simulation=False, certificates=home / "certs", supernode_auth=True)
        harness.start_proxy()
        for i in range(MEMBERS):
            harness.register(home / "nodes" / f"node-{i}.key.pub")
        yield harness


def test_only_registered_supernodes_join_and_a_run_completes_through_the_proxy(
    secured: FlowerHarness,
) -> None:
    nodes = secured.home / "nodes"
    for i in range(MEMBERS):
        secured.start_supernode(i, MEMBERS, auth_key=nodes / f"node-{i}.key")
    # A rogue node, unregistered, tries to take member 1's place.
    rogue = secured.start_supernode(1, MEMBERS, auth_key=nodes / "node-2.key", name="rogue")
    assert rogue.wait(timeout=120) != 0, "an unregistered SuperNode stayed up"
    assert "Failed to activate SuperNode" in (secured.logs / "rogue.log").read_text()
    secured.wait_online(MEMBERS)
    assert secured.online() == MEMBERS, "the rogue SuperNode is listed online"

    result = secured.run(
        {**TINY_RUN, "num-members": MEMBERS, "output-dir": str(secured.home / "runs")}
    )
    assert result.status == "finished:completed", result.details + result.output[-3000:]
    access = (secured.home / "proxy" / "access.log").read_text()
    assert "/v1/fleet/" in access and "/v1/control/" in access


def test_the_control_api_is_not_served_on_the_fleet_address(secured: FlowerHarness) -> None:
    ca = str(secured.home / "certs" / "ca.crt")
    fleet = f"https://127.0.0.1:{secured.fleet_port}"
    verify = ssl.create_default_context(cafile=ca)
    for path in ("/v1/control/list-runs", "/v1/runtime/get-nodes", "/health"):
        reply = httpx.post(f"{fleet}{path}", content=b"", verify=verify, timeout=10)
        assert reply.status_code == 404 and "nginx" in reply.text, (path, reply.text)
    # The flwr CLI pointed at the fleet address cannot list runs; at the control address it can.
    config = secured.home / "config.toml"
    config.write_text(
        config.read_text()
        + f'\n[superlink.fleet]\naddress = "127.0.0.1:{secured.fleet_port}"\n'
        + f'root-certificates = "{ca}"\n'
    )
    assert secured.flwr("ls", "fleet").returncode != 0
    assert secured.flwr("ls", "test").returncode == 0


def test_a_superlink_that_cannot_be_reached_is_a_failed_answer_though_flwr_exits_0(
    tmp_path: Path,
) -> None:
    """The stack waits for its Control API by asking ``flwr ls``; Flower's CLI in JSON mode
    exits 0 when nothing answers, so only the answer itself can say it failed."""
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "nowhere"\n\n'
        f'[superlink.nowhere]\naddress = "127.0.0.1:{free_port()}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(tmp_path)}
    done = subprocess.run(
        [str(BIN / "flwr"), "ls", "nowhere", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert flwr_answer(done) is None, done.stdout
