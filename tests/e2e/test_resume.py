"""Runs resume (`resume-from`): a run stopped in simulation (recorded `stopped`, nothing
written after), or whose ServerApp was killed in a local deployment, continues from the
server's and the members' checkpoints and ends with the same final model as an
uninterrupted run on the same seed, bit for bit under deterministic settings."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from deploy.processes import TINY_RUN, FlowerHarness, wait_for_rounds
from server.checkpoint import CHECKPOINT
from wash_fed.config import ConfigValue
from wash_fed.results import RunResult, read_results

pytestmark = pytest.mark.slow

MEMBERS = 3
CONFIG: dict[str, ConfigValue] = {
    **TINY_RUN,
    "num-members": MEMBERS,
    "deterministic": True,
    "eval-every": 0,
    "shuffle-prob": 0.2,
    "shuffle-optimizer-state": True,
}
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(run_dir / "final_model.pt", weights_only=False)
    state: dict[str, torch.Tensor] = saved["state_dict"]
    return state


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"the resumed run ended with other values in {differing}"


def run_dir_of(runs: Path, run_id: str) -> Path:
    (found,) = runs.glob(f"*-{run_id}")
    return found


def check_resumed(resumed: RunResult, interrupted: RunResult, reference: RunResult) -> int:
    """The resumed run's results continue the interrupted one's; returns the round it
    continued after."""
    assert resumed.resumed_from is not None
    after = resumed.resumed_from.round
    assert 1 <= after < reference.config.num_server_rounds, "nothing was left to resume"
    assert resumed.rounds[:after] == interrupted.rounds[:after]
    assert [r.round for r in resumed.rounds] == [r.round for r in reference.rounds]
    digests = [r.exchange_digest for r in resumed.rounds]
    assert digests == [r.exchange_digest for r in reference.rounds]
    for key in ("up.train", "down.train"):  # the setup differs: members said hello twice
        # Node ids (random, in every message's metadata) vary in their encoded length.
        assert resumed.bytes[key] == pytest.approx(reference.bytes[key], rel=1e-4), key
    return int(after)


def test_a_stopped_simulation_resumes_to_the_uninterrupted_final_model(
    simulation_harness: FlowerHarness, tmp_path: Path
) -> None:
    config = {
        **CONFIG,
        "num-server-rounds": 30,
        "output-dir": str(tmp_path / "runs"),
        "member-checkpoints": str(tmp_path / "members"),
    }
    reference = simulation_harness.run(config, federation_config=FEDERATION)
    assert reference.status == "finished:completed", reference.output[-3000:]

    submission = simulation_harness.submit(config, federation_config=FEDERATION)
    interrupted_dir = wait_for_rounds(submission, tmp_path / "runs", 2, timeout=300)
    run_id = submission.run_id()
    assert run_id is not None
    assert simulation_harness.flwr("stop", run_id, "test").returncode == 0
    submission.process.wait(timeout=120)
    deadline = time.monotonic() + 60
    while read_results(interrupted_dir).status == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    stopped = read_results(interrupted_dir)
    assert stopped.status == "stopped"
    assert simulation_harness.status(run_id).status == "finished:stopped"

    resumed = simulation_harness.run(
        {**config, "resume-from": str(interrupted_dir)}, federation_config=FEDERATION
    )
    assert resumed.status == "finished:completed", resumed.output[-3000:]
    resumed_dir = run_dir_of(tmp_path / "runs", resumed.run_id)
    reference_dir = run_dir_of(tmp_path / "runs", reference.run_id)
    after = check_resumed(
        read_results(resumed_dir), read_results(interrupted_dir), read_results(reference_dir)
    )
    assert f"continuing {interrupted_dir} after round {after}" in resumed.output
    assert_same_model(final_model(resumed_dir), final_model(reference_dir))
    assert read_results(interrupted_dir) == stopped, "written after the stop"
    # Completed: the members removed their checkpoints, those of the stopped run too.
    assert not list((tmp_path / "members").rglob("member-r*.pt"))


def serverapp_processes(harness: FlowerHarness) -> list[int]:
    found = []
    for pid in harness.descendants():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-serverapp" in command:
            found.append(pid)
    return found


def test_a_deployment_whose_serverapp_died_resumes_to_the_uninterrupted_final_model(
    tmp_path: Path, short_tmp: Path
) -> None:
    home = short_tmp  # a Unix socket's path is short
    runs = tmp_path / "runs"
    members = 2  # one fewer than in simulation: each deployed member is two processes
    config = {**CONFIG, "num-members": members, "num-server-rounds": 3, "output-dir": str(runs)}
    with FlowerHarness(tmp_path / "flwr-home") as harness:
        harness.start_superlink(simulation=False)
        harness.start_supernodes(members, worker_dir=home)
        reference = harness.run(config, timeout=900)
        assert reference.status == "finished:completed", harness.describe()

        submission = harness.submit(config)
        interrupted_dir = wait_for_rounds(submission, runs, 1, timeout=300)
        # The round's row is written before its checkpoint: kill once both are there.
        deadline = time.monotonic() + 120
        while not (interrupted_dir / CHECKPOINT).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in serverapp_processes(harness):
            os.kill(pid, signal.SIGKILL)
        # Flower would mark the run failed after two missed heartbeats (~60 s); stop it now.
        run_id = submission.run_id()
        assert run_id is not None
        assert harness.flwr("stop", run_id, "test").returncode == 0
        submission.process.wait(timeout=120)
        assert read_results(interrupted_dir).status == "running"  # it could not say

        resumed = harness.run({**config, "resume-from": str(interrupted_dir)}, timeout=900)
        assert resumed.status == "finished:completed", harness.describe()
        resumed_dir = run_dir_of(runs, resumed.run_id)
        reference_dir = run_dir_of(runs, reference.run_id)
        check_resumed(
            read_results(resumed_dir), read_results(interrupted_dir), read_results(reference_dir)
        )
        assert_same_model(final_model(resumed_dir), final_model(reference_dir))
