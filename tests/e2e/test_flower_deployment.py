"""Real local deployments: `flower-superlink` and `flower-supernode` processes on loopback,
the topology docker-compose.yml runs in containers, every member in its node's member
worker. WASH and FedAvg run to completion over TLS; a SuperNode and its worker killed in the
middle of a run come back and finish it. The ledger is checked against Flower's own
traffic figures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.flwr_cli import PROJECT, FlwrRun, Submission
from deploy.processes import TINY_RUN, FlowerHarness, wait_for_rounds
from wash_fed.config import ConfigValue
from wash_fed.keys import Metric
from wash_fed.ledger import Ledger
from wash_fed.results import ExchangeResult, RoundResult, RunResult, read_results

pytestmark = pytest.mark.slow

MEMBERS = 3
SMALL: dict[str, ConfigValue] = {**TINY_RUN, "num-members": MEMBERS}
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
    with FlowerHarness(home) as harness:
        harness.start_superlink(simulation=False, certificates=certificates)
        harness.start_supernodes(MEMBERS, worker_dir=home / "workers")
        yield harness


def assert_ledger_within_flowers_traffic(
    run_dir: Path, run: FlwrRun, *, refused: bool = False, killed: bool = False
) -> None:
    """SuperLink inbound = what members sent up; outbound = what they pulled down. The
    ledger counts the objects of delivered messages, Flower also its own framing. Traffic
    of no member is a refused node's hello (``refused``) or nothing. A node killed mid-run
    (``killed``) may have pulled one training message it never answered: Flower counts it,
    the ledger cannot confirm it, so outbound may exceed by one such message."""
    ledger = Ledger.read_csv(run_dir / "ledger.csv")
    strangers = {e.phase for e in ledger.entries if e.member < 0}
    assert strangers == ({"setup"} if refused else set()), strangers
    unanswered = max(
        (e.bytes for e in ledger.entries if e.direction == "down" and e.phase == "train"),
        default=0,
    )
    for ours, flowers, unconfirmed in (
        (ledger.total("up"), run.inbound_bytes, 0),
        (ledger.total("down"), run.outbound_bytes, unanswered if killed else 0),
    ):
        assert 0 < ours <= flowers <= (ours + unconfirmed) * (1 + FRAMING_SHARE), (
            ours,
            flowers,
            unconfirmed,
        )


def worker_pids(results: RunResult) -> dict[str, set[int]]:
    """The worker process each member reported, per member, over all rounds."""
    pids: dict[str, set[int]] = {}
    for row in results.rounds:
        for member, metrics in row.members.items():
            pids.setdefault(member, set()).add(int(metrics[Metric.WORKER_PID]))
    return pids


def assert_time_split_as_a_deployment(results: RunResult) -> None:
    """Every message went through a ClientApp that relayed it to the member worker
    (Flower's delivery, measured by the member's side), none waited for a simulation slot,
    and the rest of the way is transfer; the parts add up to each round, and the message
    rounds outside training, the hello first, are split too."""
    rows: list[RoundResult | ExchangeResult] = [*results.rounds, *results.exchanges]
    for row in rows:
        assert row.time is not None
        assert sum(row.time.as_dict().values()) == pytest.approx(row.seconds, abs=1e-9)
        assert row.time.slot == 0.0 and row.time.delivery > 0.0, row
        assert row.time.transfer > 0.0, row
    assert all(row.time.compute > 0.0 for row in results.rounds if row.time is not None)
    for row in results.rounds:
        assert all(m[Metric.RESPOND_SECONDS] > 0.0 for m in row.members.values()), row.members
    assert results.exchanges and results.exchanges[0].phase == "setup", results.exchanges


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("strategy", ["wash", "fedavg"])
def test_deployment_over_tls_runs_in_member_workers_and_its_ledger_matches_flowers_traffic(
    deployment: FlowerHarness, tmp_path: Path, strategy: str
) -> None:
    result = deployment.run(
        {**SMALL, "strategy": strategy, "output-dir": str(tmp_path)}, timeout=900
    )
    assert result.status == "finished:completed", f"{result.details}\n{deployment.describe()}"
    (run_dir,) = tmp_path.glob(f"*-{result.run_id}")
    results = read_results(run_dir)
    assert results.status == "completed"
    assert [r.answered for r in results.rounds] == [MEMBERS] * results.config.num_server_rounds
    pids = worker_pids(results)
    assert all(len(p) == 1 for p in pids.values()), f"a member changed process: {pids}"
    time.sleep(2.0)  # the workers acknowledged the end of the run; let them exit
    assert all(gone(pid) for (pid,) in pids.values()), "a member worker outlived its run"
    assert_ledger_within_flowers_traffic(run_dir, result)
    assert_time_split_as_a_deployment(results)


def wait_for_line(submission: Submission, pattern: str, timeout: float) -> re.Match[str]:
    """The first match of ``pattern`` in the run's output, once it is there."""
    deadline = time.monotonic() + timeout
    while (found := re.search(pattern, submission.text())) is None:
        if time.monotonic() > deadline or submission.process.poll() is not None:
            raise AssertionError(f"no {pattern!r} in:\n{submission.text()[-3000:]}")
        time.sleep(0.5)
    return found


def test_a_member_killed_mid_run_comes_back_from_its_checkpoint(
    tmp_path: Path, short_tmp: Path
) -> None:
    """SIGKILL one SuperNode and its worker after round 2 of 6. A new node that says it is
    that member (a fresh worker, no checkpoint) is refused: it lacks the member's
    credential. The real SuperNode, restarted, comes back under a new node id from its
    checkpoint, and the run ends with every member in the soup."""
    members, victim = 3, 1
    workers = short_tmp
    with FlowerHarness(tmp_path / "home") as harness:
        harness.start_superlink(simulation=False)
        harness.start_supernodes(members, worker_dir=workers)
        config = {
            **TINY_RUN,
            "num-members": members,
            "num-server-rounds": 6,
            # Long enough for a loaded machine's rounds; the dead node's messages end sooner,
            # once the SuperLink marks it offline (about a minute without heartbeats).
            "round-timeout": 120.0,
            "output-dir": str(tmp_path / "runs"),
        }
        submission = harness.submit(config)
        run_dir = wait_for_rounds(submission, tmp_path / "runs", 2, timeout=300)
        run_id = submission.run_id()
        (pid_file,) = (workers / f"member-{victim}").glob(f"run-{run_id}/worker.pid")
        os.killpg(harness.supernodes[victim].pid, signal.SIGKILL)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        harness.start_supernode(victim, members, worker_dir=workers / "impostor", name="impostor")
        refused = wait_for_line(
            submission,
            rf"node (\d+) claims member {victim}, held by node (\d+), without the member's "
            r"credential; refused",
            timeout=300,
        )
        assert refused.group(1) != refused.group(2)
        harness.start_supernode(victim, members, worker_dir=workers)
        result = harness.finish(submission, timeout=900)
        assert result.status == "finished:completed", f"{result.details}\n{harness.describe()}"
        results = read_results(run_dir)
        final = results.final_figures()
        assert final.collected == list(range(members)), "a member is missing from the soup"
        rows = results.rounds
        assert len(rows) == 6 and rows[-1].answered == members
        missed = [r.round for r in rows if str(victim) in r.failed]
        assert 3 in missed, missed  # killed after round 2
        back = [r for r in rows if r.round > max(missed)]
        assert back and all(str(victim) in r.members for r in back)
        pattern = (
            rf"member {victim} is back on node \d+ \(restored from its checkpoint at step (\d+)\)"
        )
        restored = re.search(pattern, result.output)
        assert restored, result.output[-3000:]
        assert int(restored.group(1)) in (10, 15)  # after round 2 (or 3, if it got that far)
        assert_ledger_within_flowers_traffic(run_dir, result, refused=True, killed=True)


def test_a_stalled_member_costs_a_round_the_stragglers_wait_not_the_timeout(
    tmp_path: Path, short_tmp: Path
) -> None:
    """SIGSTOP one SuperNode after round 1 of 5 (a machine that stalls, for less than the
    minute after which the SuperLink would call it offline): the round it misses goes on
    without it once the stragglers' wait is over, long before the round timeout; SIGCONT it,
    and it takes part again, to the soup. (Its member worker alone stopped would not do: the
    next message finds it unresponsive and starts another, from its checkpoint.)"""
    members, victim, runs = 3, 2, tmp_path / "runs"
    config = {
        **TINY_RUN,
        "num-members": members,
        "num-server-rounds": 5,
        "round-timeout": 600.0,
        "straggler-factor": 1.0,
        "straggler-min-wait": 5.0,
        "output-dir": str(runs),
    }
    with FlowerHarness(tmp_path / "home") as harness:
        harness.start_superlink(simulation=False)
        harness.start_supernodes(members, worker_dir=short_tmp)
        submission = harness.submit(config)
        run_dir = wait_for_rounds(submission, runs, 1, timeout=300)
        node = harness.supernodes[victim].pid
        os.killpg(node, signal.SIGSTOP)
        try:
            missed = wait_for_line(submission, rf"stopped waiting for member\(s\) {victim} ", 300)
        finally:
            os.killpg(node, signal.SIGCONT)
        result = harness.finish(submission, timeout=900)
    assert result.status == "finished:completed", f"{result.details}\n{result.output[-3000:]}"
    results = read_results(run_dir)
    stalled = [row for row in results.rounds if str(victim) in row.failed]
    assert stalled and all(row.seconds < 300 for row in stalled), missed.string[-2000:]
    assert results.rounds[-1].answered == members, "taken back after the stall"
    assert results.final_figures().collected == list(range(members))
