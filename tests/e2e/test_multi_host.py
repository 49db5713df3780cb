"""The deployment across machines, emulated on this one (:mod:`deploy.emulated_hosts`) with
the roles' own commands (docs/deployment.md): a server host (``python -m deploy.roles
server --name superlink.test``) and two node hosts (``python -m deploy.roles node ...
--members 0-2 --of 5`` and ``3-4``),
each a compose project of its own on a network of its own that shares nothing with the
server host's networks and reaches it only through the published Fleet port, by the name
its certificate carries, over a link shaped with ``tc`` (host A 20 Mbit/s, host B 10 Mbit/s;
:mod:`deploy.links`). Their keys are made on each node host and registered with
``python -m deploy.roles register``. Through it:

- WASH, then FedAvg, ``finished:completed``; every byte the ledger counts for a host's
  members crossed that host's link, and what else crossed is Flower's own (framing, polls,
  the app bundle each SuperNode fetches);
- a run started just after host B went down (SIGKILL: its nodes still listed online) starts
  with host A's members (``min-members=3``) and takes B's in when B comes up; B killed
  (SIGKILL, every container) mid-run and started again: its members continue from their
  checkpoints; B's link cut for 60 s: the run goes on without them, the rounds they miss end
  on the stragglers' wait or Flower's offline mark (never the round timeout), B is taken
  back, and the run completes with all five in the soup;
- the SuperLink's container killed mid-run and started again: the run is
  ``finished:failed`` with Flower's reason, and ``resume-from`` completes it with every
  member continuing from its checkpoint;
- a node host with another CA, one that uses a name the certificate does not carry, and
  one whose key is not registered are each refused, saying why.

Everything the test started (containers, networks, volumes, shaping) is removed afterwards,
whatever happens. Only this machine's own bridges and the test's containers are touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.emulated_hosts import EmulatedDeployment, EmulatedHost, NodeJoin, join
from deploy.engine import TEST_STACKS
from deploy.flwr_cli import BIN, PROJECT
from deploy.nodes import service_name
from deploy.processes import TINY_RUN
from deploy.roles import node_file
from deploy.stack import CERTS, Stack
from server.checkpoint import CHECKPOINT
from wash_fed.config import ConfigValue
from wash_fed.ledger import Ledger
from wash_fed.results import RunResult, read_results

pytestmark = [pytest.mark.slow, pytest.mark.compose]

RUNS = "/app/runs"
MEMBERS = 5
RUN: dict[str, ConfigValue] = {
    **TINY_RUN,
    "num-members": MEMBERS,
    "output-dir": RUNS,
    "round-timeout": 300,
    "node-wait-timeout": 120,
    "straggler-min-wait": 10,
}
FRAMING_PER_MEMBER = 1 << 20
"""What a member's SuperNode may send or receive beyond the ledger's payloads and the app
bundle in a short run: HTTP and TLS framing, polls, heartbeats (measured: 0.2-0.4 MB)."""


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, one_stack_at_a_time: None
) -> Iterator[EmulatedDeployment]:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("emulated hosts need root on Linux (networks, tc)")
    home = tmp_path_factory.mktemp("flwr-home")
    with EmulatedDeployment(home, tmp_path_factory.mktemp("keys")) as deployment:
        yield deployment


def finished(server: Stack, config: dict[str, ConfigValue], out: Path) -> tuple[RunResult, str]:
    """A run through the server host, completed; its results and its output."""
    run = server.run(config, timeout=1500)
    assert run.status == "finished:completed", f"{run.status}\n{run.output[-4000:]}"
    return read_results(server.fetch_run(RUNS, run.run_id, out) / "results.json"), run.output


def ledger_bytes(folder: Path, members: range) -> tuple[int, int]:
    entries = Ledger.read_csv(folder / "ledger.csv").entries
    up = sum(e.bytes for e in entries if e.member in members and e.direction == "up")
    down = sum(e.bytes for e in entries if e.member in members and e.direction == "down")
    return up, down


def app_bundle_bytes(tmp: Path) -> int:
    """The size of the FAB every SuperNode fetches for a run: ``flwr build`` of the project's
    files (those git does not ignore), copied into a folder named as Flower requires an
    app's folder to be, whatever the checkout's own folder is called."""
    listed = subprocess.run(
        ["git", "-C", str(PROJECT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    )
    app = tmp / "wash-fed"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (PROJECT / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(PROJECT / name, app / name)
    built = subprocess.run(
        [str(BIN / "flwr"), "build", "--app", str(app)], cwd=tmp, capture_output=True, text=True
    )
    assert built.returncode == 0, f"flwr build failed: {built.stdout}{built.stderr}"
    (fab,) = tmp.glob("*.fab")
    return fab.stat().st_size


def check_bytes_through_each_link(server: Stack, hosts: list[EmulatedHost], tmp: Path) -> None:
    bundle = app_bundle_bytes(tmp)
    for strategy in ("wash", "fedavg"):
        for host in hosts:
            host.shape()  # counters from zero
        config = {**RUN, "strategy": strategy, "num-server-rounds": 2}
        results, _ = finished(server, config, tmp / strategy)
        assert results.status == "completed"
        for host in hosts:
            sent = dict(zip(("up", "down"), host.link.sent(host.containers()), strict=True))
            counted = dict(
                zip(("up", "down"), ledger_bytes(tmp / strategy, host.members), strict=True)
            )
            extra = {"up": 0, "down": bundle}
            for way in ("up", "down"):
                allowed = 1.1 * counted[way] + len(host.members) * (extra[way] + FRAMING_PER_MEMBER)
                assert counted[way] > 0 and counted[way] <= sent[way] <= allowed, (
                    f"{strategy}, {host.name} {way}: link {sent[way]} B, ledger {counted[way]} B"
                )


def rows_with(server: Stack, members: set[str]) -> int:
    """How many rounds of the run in progress had all of ``members`` reply."""
    text = server.in_superlink(f"cat $(ls -td {RUNS}/*/ | head -1)results.json")
    rows = json.loads(text)["rounds"]
    return sum(1 for row in rows if members <= set(row["members"]))


def has_a_checkpoint(node_host: Stack) -> Callable[[], bool]:
    """Whether member 3's worker has written a checkpoint on its volume."""
    find = "find /var/lib/wash-fed/member -name 'member-r*.pt'"

    def written() -> bool:
        done = node_host.compose("exec", "-T", service_name(3), "sh", "-c", find, check=False)
        return ".pt" in done.stdout

    return written


def says(stack: Stack, reason: str) -> Callable[[], bool]:
    """Whether the node host's SuperNode has logged ``reason``."""
    return lambda: reason in stack.logs(service_name(0), lines=200)


def wait_until(what: str, condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(2)


def check_a_host_down_killed_and_cut(server: Stack, hosts: list[EmulatedHost], tmp: Path) -> None:
    host_b = hosts[1]
    b_members = {str(m) for m in host_b.members}
    # Just gone down: its nodes are still listed online for a minute, and answer no one.
    host_b.stack.compose("kill", "-s", "KILL", timeout=300)
    config = {**RUN, "num-server-rounds": 14, "min-members": 3, "node-wait-timeout": 20}
    submission = server.submit(config)
    server.wait_for_round(RUNS, 1, timeout=900)
    host_b.stack.compose("start", timeout=300)  # comes up: taken in
    wait_until("host B's members taken in", lambda: rows_with(server, b_members) >= 1, 600)
    wait_until("member 3's first checkpoint", has_a_checkpoint(host_b.stack), 300)
    host_b.stack.compose("kill", "-s", "KILL", timeout=300)
    host_b.stack.compose("start", timeout=300)
    taken = rows_with(server, b_members)
    wait_until(
        "host B's members back after the kill", lambda: rows_with(server, b_members) > taken, 600
    )
    host_b.link.cut()
    time.sleep(60)
    host_b.link.restore()
    taken = rows_with(server, b_members)
    wait_until("host B back after the cut", lambda: rows_with(server, b_members) > taken, 600)
    run = server.finish(submission, timeout=1500)
    assert run.status == "finished:completed", f"{run.status}\n{run.output[-4000:]}"
    results = read_results(server.fetch_run(RUNS, run.run_id, tmp / "resilience") / "results.json")
    final = results.final_figures()
    assert final.collected == list(range(MEMBERS)), f"{final}\n{run.output[-6000:]}"
    missed = [r for r in results.rounds if b_members & set(r.failed)]
    assert missed, "host B's members should have missed rounds (down, killed, cut)"
    # A missed round ends on the stragglers' rule or on Flower's word that the node is
    # offline, whichever comes first: never on the round timeout.
    assert all(r.seconds < RUN["round-timeout"] for r in results.rounds), [  # type: ignore[operator]
        (r.round, r.seconds) for r in results.rounds
    ]
    logs = host_b.stack.compose(
        "exec", "-T", service_name(3), "sh", "-c", "cat /var/lib/wash-fed/member/run-*/worker.log"
    ).stdout
    resumed = re.findall(r"member 3 resumed at round (\d+)", logs)
    assert resumed, logs[-3000:]


def check_a_killed_superlink_fails_then_resumes(server: Stack, tmp: Path) -> None:
    """The SuperLink's container SIGKILLed after round 2's checkpoint and started again: the
    run is ``finished:failed`` with Flower's reason, the proxies reach the new container, the
    node hosts come back, and ``resume-from`` completes it with every member."""
    config = {**RUN, "num-server-rounds": 5}
    submission = server.submit(config)
    server.wait_for_round(RUNS, 2, timeout=900)
    run_id = submission.run_id()
    assert run_id is not None
    folder = server.in_superlink(f"ls -d {RUNS}/*-{run_id}").strip()

    def checkpointed() -> bool:
        return CHECKPOINT in server.in_superlink(f"ls {folder}")

    wait_until("round 2's checkpoint", checkpointed, 120)
    server.compose("kill", "-s", "KILL", "superlink", timeout=120)
    submission.process.wait(timeout=120)
    server.compose("start", "superlink", timeout=120)
    server.wait_for_control()

    def failed() -> bool:
        return server.status(run_id).status == "finished:failed"

    wait_until("Flower marks the run failed", failed, 300)
    assert "heartbeat" in server.status(run_id).details, server.status(run_id)
    server.wait_online(MEMBERS, timeout=300)
    resumed, output = finished(server, {**config, "resume-from": folder}, tmp / "resumed")
    assert resumed.resumed_from is not None and resumed.resumed_from.round >= 2, output[-3000:]
    assert resumed.final_figures().collected == list(range(MEMBERS)), output[-3000:]
    assert output.count("continues from its round") == MEMBERS, output[-3000:]


def check_strangers_are_refused(home: Path, hosts: list[EmulatedHost], tmp: Path) -> None:
    """One node host at a time on host A's network, each refused; its reason in its log."""
    other_ca = tmp / "other-ca"
    subprocess.run(
        ["bash", str(CERTS / "generate.sh"), str(other_ca)], check=True, capture_output=True
    )
    engine = hosts[0].stack.engine
    cases = {
        "ca": (
            NodeJoin(ca=other_ca / "ca.crt", project=f"{TEST_STACKS}-stranger-ca"),
            "certificate verify failed: unable to get local issuer",
        ),
        "name": (
            NodeJoin(name="wrong.test", project=f"{TEST_STACKS}-stranger-name"),
            "Hostname mismatch, certificate is not valid for 'wrong.test'",
        ),
        "key": (NodeJoin(project=f"{TEST_STACKS}-stranger-key"), "Failed to activate SuperNode"),
    }
    for case, (how, reason) in cases.items():
        keys = tmp / f"keys-{case}"
        stack = join(home, engine, hosts[0].name, "0", MEMBERS, keys, how)
        try:
            wait_until(f"{case}: refused", says(stack, reason), 120)
        finally:
            stack.down()
            node_file(stack.project).unlink(missing_ok=True)


def test_node_hosts_join_over_their_links_survive_and_strangers_do_not(
    deployment: EmulatedDeployment, tmp_path: Path
) -> None:
    server, hosts, home = deployment.server, deployment.hosts, deployment.home
    check_a_host_down_killed_and_cut(server, hosts, tmp_path)
    check_bytes_through_each_link(server, hosts, tmp_path)
    check_a_killed_superlink_fails_then_resumes(server, tmp_path)
    check_strangers_are_refused(home, hosts, tmp_path)
