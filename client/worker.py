"""The member worker: one long-lived process per member and run, on its SuperNode's machine.

It keeps the member -- model, optimizer, schedule, data position (on the GPU when there is
one) -- in memory across every message of a run, so a round costs its training and little
else, and it checkpoints the member to node-local disk after every round
(:mod:`client.checkpoints`). A worker that is restarted for the same run and partition
continues from its newest checkpoint.

Lifetime: the ClientApp starts it on the node's first message of a run
(:func:`client.worker_link.forward`); it ends after the run's ``query.end`` message
(removing its checkpoints unless the run can be resumed), or after
``worker-idle-timeout`` seconds without a message. It listens on a Unix socket in a folder
only its user can enter.

    python -m client.worker --dir <worker-dir>/run-<run id> --run-id <run id>
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from flwr.app import RecordDict

from client.checkpoints import MemberCheckpoints
from client.task import MemberTask
from client.worker_link import (
    CHANNEL_OPTIONS,
    SERVICE,
    WorkerRequest,
    decode_request,
    encode_reply,
    socket_path,
)
from wash_fed.config import WashFedConfig
from wash_fed.keys import MessageType, Metric, Record
from wash_fed.routing import member_index

__all__ = ["MemberWorker", "main"]

FIRST_MESSAGE_TIMEOUT = 120.0
"""Seconds a new worker waits for its first message (its starter sends it at once)."""


class MemberWorker:
    """The member of one run, and what the gRPC method does with each request."""

    def __init__(self, directory: Path, run_id: int) -> None:
        self.directory = directory
        self.run_id = run_id
        self.task: MemberTask | None = None
        self.idle_timeout = FIRST_MESSAGE_TIMEOUT
        self.last_message = time.monotonic()
        self.finished = threading.Event()

    def handle(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        """One message: the reply content, or a gRPC error carrying the reason."""
        self.last_message = time.monotonic()
        try:
            return encode_reply(self._handle(decode_request(body)))
        except Exception as err:  # the reason travels back to the ClientApp and the server
            print(f"failed: {type(err).__name__}: {err}", flush=True)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            self.last_message = time.monotonic()

    def _handle(self, request: WorkerRequest) -> RecordDict:
        if request.run_id != self.run_id:
            raise ValueError(f"this worker serves run {self.run_id}, not run {request.run_id}")
        task = self._task(request)
        started = time.perf_counter()
        try:
            reply = task.handle(request.message_type, request.content)
        finally:  # the run is over for this member even if its last evaluation failed
            if request.message_type == MessageType.END:
                self.finished.set()
        # One line per message: where a member stood when a run stalls (the GPU check's
        # logs, a SuperNode's worker.log).
        print(
            f"{request.message_type}: handled in {time.perf_counter() - started:.2f} s",
            flush=True,
        )
        metrics = reply.metric_records[Record.METRICS]
        metrics[Metric.WORKER_PID] = os.getpid()
        return reply

    def _task(self, request: WorkerRequest) -> MemberTask:
        """The resident member; built (or restored from its checkpoint) on first use."""
        cfg = WashFedConfig.from_mapping(request.run_config)
        partition = member_index(request.node_config, cfg.num_members)
        if self.task is not None:
            if (self.task.member.index, self.task.cfg) != (partition, cfg):
                raise ValueError(
                    f"this worker holds member {self.task.member.index} of run {self.run_id}; "
                    f"asked for member {partition} with another configuration"
                )
            return self.task
        started = time.perf_counter()
        task = MemberTask(cfg, partition, request.node_config, MemberCheckpoints(self.directory))
        task.restore_own()
        task.startup_seconds = time.perf_counter() - started
        print(
            f"member {partition} ready on {task.member.device} in {task.startup_seconds:.2f} s "
            f"({len(task.data.train)} training images)",
            flush=True,
        )
        self.idle_timeout = cfg.runtime.worker_idle_timeout
        self.task = task
        return task

    def idle(self) -> bool:
        return time.monotonic() - self.last_message > self.idle_timeout


def serve(directory: Path, run_id: int) -> str:
    """Serve until the run ends or the worker idles out; returns why it stopped."""
    os.umask(0o077)  # the socket, log and checkpoint: this user's only
    path = socket_path(directory)
    path.unlink(missing_ok=True)  # left by a worker that was killed
    worker = MemberWorker(directory, run_id)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="member"),
        options=CHANNEL_OPTIONS,
    )
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
        worker.handle
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Handle": handler})]
    )
    server.add_insecure_port(f"unix:{path}")
    server.start()
    pid_file = directory / "worker.pid"
    pid_file.write_text(str(os.getpid()))
    print(f"member worker {os.getpid()} for run {run_id} listening on {path}", flush=True)
    try:
        while not worker.finished.wait(timeout=1.0):
            if worker.idle():
                return f"no message for {worker.idle_timeout:.0f} s"
        return "the run ended"
    finally:
        server.stop(grace=5.0).wait()
        path.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="the worker's run folder")
    parser.add_argument("--run-id", type=int, required=True)
    args = parser.parse_args(argv)
    reason = serve(args.dir, args.run_id)
    print(f"member worker {os.getpid()} stopped: {reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
