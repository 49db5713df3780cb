"""The member worker's message loop, served in this process on its real Unix socket: it
keeps its member across messages, checkpoints it after every round, refuses another run's
messages with the reason, ends with its run (removing its checkpoints, socket and pid
file), and stops when idle."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flwr.app import ConfigRecord, RecordDict

from client.app import WORKER_MEMBER
from client.task import worker_member
from wash_fed import worker, worker_link
from wash_fed.keys import Config, MessageType, Metric, Record, Reply

RUN_ID = 7
RUN_CONFIG = {
    "num-members": 1,
    "local-steps": 2,
    "batch-size": 32,
    "train-subset": 300,
    "holdout-size": 0,
    "test-subset": 100,
}
NODE_CONFIG = {"partition-id": 0, "num-partitions": 1}


class Served:
    """A worker's loop on a thread; :attr:`reason` is why it stopped, once it has."""

    def __init__(self, worker_dir: Path) -> None:
        self.worker_dir = worker_dir
        self.directory = worker_link.run_directory(worker_dir, RUN_ID)
        self.directory.mkdir(parents=True, mode=0o700)
        self.reason: str | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        target = f"unix:{worker_link.socket_path(self.directory)}"
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)

    def _serve(self) -> None:
        self.reason = worker.serve(self.directory, RUN_ID, worker_member)

    def send(self, message_type: str, **config: int | bool | str) -> RecordDict:
        content = RecordDict({Record.CONFIG: ConfigRecord(dict(config))})
        return worker_link.forward(
            self.worker_dir, WORKER_MEMBER, message_type, content, RUN_ID, RUN_CONFIG, NODE_CONFIG
        )


@pytest.fixture
def served(short_tmp: Path) -> Iterator[Served]:
    loop = Served(short_tmp)
    yield loop
    loop.thread.join(timeout=30)


def metrics(reply: RecordDict) -> dict[str, float]:
    return {k: float(v) for k, v in reply.metric_records[Record.METRICS].items()}  # type: ignore[arg-type]


def test_the_worker_keeps_its_member_until_the_run_ends(served: Served) -> None:
    hello = metrics(served.send(MessageType.HELLO, **{Config.SERVER_ROUND: 0}))
    assert hello[Metric.WORKER_PID] == os.getpid() and hello[Metric.STEPS_DONE] == 0
    for server_round in (1, 2):
        reply = served.send(
            MessageType.TRAIN, **{Config.SERVER_ROUND: server_round, Config.REPLY: Reply.METRICS}
        )
        assert metrics(reply)[Metric.CHECKPOINT_SECONDS] >= 0
    assert len(list(served.directory.glob("*.pt"))) >= 1, "a checkpoint after each round"
    ended = metrics(served.send(MessageType.END, **{Config.SERVER_ROUND: 3}))
    assert ended[Metric.STEPS_DONE] == 2 * RUN_CONFIG["local-steps"], "one member throughout"
    served.thread.join(timeout=30)
    assert served.reason == "the run ended"
    assert not list(served.directory.glob("*.pt")), "the completed run's checkpoints removed"
    assert not (served.directory / "worker.sock").exists()
    assert not (served.directory / "worker.pid").exists()


def test_another_runs_message_is_refused_with_the_reason(served: Served) -> None:
    request = worker_link.WorkerRequest(
        MessageType.HELLO,
        RUN_ID + 1,
        RUN_CONFIG,
        NODE_CONFIG,
        RecordDict({Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: 0})}),
    )
    target = f"unix:{worker_link.socket_path(served.directory)}"
    with grpc.insecure_channel(target) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(worker_link.METHOD)
        with pytest.raises(grpc.RpcError) as refused:
            call(worker_link.encode_request(request))
    assert f"this worker serves run {RUN_ID}, not run {RUN_ID + 1}" in str(refused.value)
    served.send(MessageType.END, **{Config.SERVER_ROUND: 1})  # and it still serves its own


def test_an_idle_worker_stops(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "FIRST_MESSAGE_TIMEOUT", 0.2)
    idle = Served(short_tmp)
    idle.thread.join(timeout=30)
    assert idle.reason == "no message for 0 s"
    assert not (idle.directory / "worker.sock").exists()
