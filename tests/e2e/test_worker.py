"""The member worker and its link, as real processes: the ClientApp's side never imports
torch, the worker keeps its member across messages, resumes it from its checkpoint after
SIGKILL, refuses what is not its own, and ends with its run or when idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, TypedDict

import pytest

from deploy.flwr_cli import PROJECT
from wash_fed import worker_link
from wash_fed.config import ConfigValue
from wash_fed.keys import Config, MessageType, Metric

RUN_ID = 7
RUN_CONFIG: dict[str, ConfigValue] = {
    "num-members": 1,
    "num-server-rounds": 4,
    "local-steps": 3,
    "batch-size": 32,
    "train-subset": 600,
    "holdout-size": 0,
    "test-subset": 200,
}
NODE_CONFIG: dict[str, ConfigValue] = {"partition-id": 0, "num-partitions": 1}


class ProxyAnswer(TypedDict):
    """The proxy's last line: each reply (its metrics and info, or the error) and whether
    the ClientApp's side imported torch."""

    torch: bool
    replies: list[dict[str, dict[str, Any]]]


# Runs in a fresh interpreter: forwards messages the way the ClientApp does and reports
# what it got back and whether torch was imported along the way.
PROXY = textwrap.dedent(
    """
    import json, sys
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from client.app import WORKER_MEMBER  # the ClientApp module itself
    from wash_fed import worker_link

    worker_dir, run_id, run_config, node_config, steps = json.loads(sys.argv[1])
    out = []
    for message_type, config, *arrays in steps:  # arrays: an empty "arrays" record
        content = RecordDict({"config": ConfigRecord(config)})
        if arrays:
            content["arrays"] = ArrayRecord()
        try:
            reply = worker_link.forward(
                worker_dir, WORKER_MEMBER, message_type, content, run_id, run_config,
                node_config
            )
            out.append({"metrics": dict(reply.metric_records["metrics"]),
                        "info": dict(reply.config_records.get("info", {}))})
        except worker_link.WorkerError as err:
            out.append({"error": str(err)})
    print(json.dumps({"torch": "torch" in sys.modules, "replies": out}))
    """
)


def proxy(
    worker_dir: Path,
    steps: list[tuple[Any, ...]],
    *,
    run_config: dict[str, ConfigValue] | None = None,
    node_config: dict[str, ConfigValue] | None = None,
) -> ProxyAnswer:
    """What the ClientApp-side proxy got back for ``steps``, and whether it imported torch."""
    args = [str(worker_dir), RUN_ID, run_config or RUN_CONFIG, node_config or NODE_CONFIG, steps]
    done = subprocess.run(
        [sys.executable, "-c", PROXY, json.dumps(args)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer: ProxyAnswer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def train(server_round: int) -> tuple[str, dict[str, ConfigValue]]:
    return MessageType.TRAIN, {Config.SERVER_ROUND: server_round, Config.REPLY: "metrics"}


HELLO = (MessageType.HELLO, {Config.SERVER_ROUND: 0})
END = (MessageType.END, {Config.SERVER_ROUND: 5})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by whoever adopted it) counts as gone.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_worker_keeps_its_member_resumes_after_sigkill_and_ends_with_the_run(
    tmp_path: Path, fashion_train: object
) -> None:
    first = proxy(tmp_path, [HELLO, train(1), train(2)])
    assert first["torch"] is False, "the ClientApp's worker path imported torch"
    hello, round1, round2 = (r["metrics"] for r in first["replies"])
    pid = int(hello[Metric.WORKER_PID])
    assert round1[Metric.WORKER_PID] == round2[Metric.WORKER_PID] == pid  # one process
    assert round2[Metric.RESTORE_SECONDS] == 0.0  # resident: nothing to restore
    assert first["replies"][0]["info"]["resumed"] is False

    run_dir = worker_link.run_directory(tmp_path, RUN_ID)
    assert run_dir.stat().st_mode & 0o777 == 0o700
    # The messages name no server checkpoint: the member keeps its newest round only.
    assert [p.name for p in run_dir.glob("member-r*.pt")] == ["member-r2.pt"]
    assert (run_dir / "worker.sock").is_socket()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)

    second = proxy(tmp_path, [HELLO, train(3), END])
    hello, round3, ended = (r["metrics"] for r in second["replies"])
    assert second["replies"][0]["info"]["resumed"] is True
    assert hello[Metric.STEPS_DONE] == 2 * RUN_CONFIG["local-steps"]  # rounds 1 and 2 kept
    new_pid = int(hello[Metric.WORKER_PID])
    assert new_pid != pid and hello[Metric.RESTORE_SECONDS] > 0
    assert round3[Metric.WORKER_PID] == new_pid
    assert ended[Metric.STEPS_DONE] == 3 * RUN_CONFIG["local-steps"]
    assert wait_gone(new_pid), "the worker outlived its run"
    assert not list(run_dir.glob("member-r*.pt")) and not (run_dir / "worker.sock").exists()


@pytest.mark.slow
def test_worker_refuses_another_member_and_idles_out(tmp_path: Path, fashion_train: object) -> None:
    config = {**RUN_CONFIG, "num-members": 2, "worker-idle-timeout": 3.0}
    result = proxy(
        tmp_path,
        [HELLO, HELLO],
        run_config=config,
        node_config={"partition-id": 0, "num-partitions": 2},
    )
    pid = int(result["replies"][0]["metrics"][Metric.WORKER_PID])
    other = proxy(
        tmp_path, [HELLO], run_config=config, node_config={"partition-id": 1, "num-partitions": 2}
    )
    (refused,) = other["replies"]
    assert "holds member 0" in refused["error"]
    assert wait_gone(pid, timeout=30), "an idle worker did not exit"
    log = (worker_link.run_directory(tmp_path, RUN_ID) / "worker.log").read_text()
    assert "stopped: no message for 3 s" in log


@pytest.mark.slow
def test_a_member_whose_last_evaluation_fails_still_ends_with_the_run(
    tmp_path: Path, fashion_train: object
) -> None:
    """The run's last message carries the final model to evaluate: a member that cannot
    (here: a patch over a model it never kept) answers with the error, and still removes
    its checkpoints and exits, as the run is over."""
    bad_end = (MessageType.END, {Config.SERVER_ROUND: 5, Config.PATCH: True}, "arrays")
    result = proxy(tmp_path, [HELLO, train(1), bad_end])
    hello, _, ended = result["replies"]
    assert "kept no model" in ended["error"]
    assert wait_gone(int(hello["metrics"][Metric.WORKER_PID])), "the worker outlived its run"
    run_dir = worker_link.run_directory(tmp_path, RUN_ID)
    assert not list(run_dir.glob("member-r*.pt")) and not (run_dir / "worker.sock").exists()
