"""The member worker: one long-lived process per member and run, on its SuperNode's machine.

It keeps the member -- model, optimizer, the task's own state (on the GPU when there is
one) -- in memory across every message of a run, so a round costs its training and little
else. It builds the member, at the run's first message, with the function its command line
names (:class:`wash_fed.worker_link.MemberSource`): a user's ``build`` as
:func:`wash_fed.member_app.wash_client_app` takes it, or a :data:`MemberFactory` (the
built-in app's checkpoints the member to node-local disk after every round, so that a
worker restarted for the same run and partition continues from its newest checkpoint).

Lifetime: the ClientApp starts it on the node's first message of a run
(:func:`wash_fed.worker_link.forward`); it ends after the run's ``query.end`` message, or
after ``worker-idle-timeout`` seconds without a message (the run configuration's key of
that name where it has one, else 1800). It listens on a Unix socket in a folder only its
user can enter.

    python -m wash_fed.worker --dir <worker-dir>/run-<run id> --run-id <run id> \
        (--build | --factory) <package.module:function>
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import cast

import grpc
from flwr.app import Context, RecordDict

from wash_fed.clientapp import WashMember
from wash_fed.config import RuntimeConfig
from wash_fed.keys import MessageType, Metric, Record
from wash_fed.member_app import MemberParts, built_member
from wash_fed.worker_link import (
    CHANNEL_OPTIONS,
    SERVICE,
    MemberSource,
    WorkerRequest,
    decode_request,
    encode_reply,
    socket_path,
)

__all__ = ["MemberFactory", "MemberWorker", "main"]

FIRST_MESSAGE_TIMEOUT = 120.0
"""Seconds a new worker waits for its first message (its starter sends it at once)."""
IDLE_TIMEOUT_KEY = "worker-idle-timeout"
"""The run configuration's key for a worker's idle timeout, where it has one."""

MemberFactory = Callable[[Context, str, RecordDict, Path], WashMember]
"""Builds the member a worker keeps from the run's context (run id, run and node
configuration; its ``state`` empty), the first message's type and content, and the worker's
own folder (for checkpoints)."""


class MemberWorker:
    """The member of one run, and what the gRPC method does with each request."""

    def __init__(self, directory: Path, run_id: int, factory: MemberFactory) -> None:
        self.directory = directory
        self.run_id = run_id
        self.factory = factory
        self.member: WashMember | None = None
        self.serving: WorkerRequest | None = None
        """The request the member was built for: later ones must be of the same member."""
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
        member = self._member(request)
        started = time.perf_counter()
        try:
            reply = member.handle(request.message_type, request.content)
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

    def _member(self, request: WorkerRequest) -> WashMember:
        """The resident member; built by the factory on first use."""
        if self.member is not None and self.serving is not None:
            same = (self.serving.run_config, self.serving.node_config)
            if (request.run_config, request.node_config) != same:
                raise ValueError(
                    f"this worker holds member {self.member.member.index} of run "
                    f"{self.run_id}; asked with another run or node configuration"
                )
            return self.member
        started = time.perf_counter()
        context = Context(
            run_id=request.run_id,
            node_id=0,
            node_config=dict(request.node_config),
            state=RecordDict(),
            run_config=dict(request.run_config),
        )
        member = self.factory(context, request.message_type, request.content, self.directory)
        member.startup_seconds = time.perf_counter() - started
        print(
            f"member {member.member.index} ready on {member.member.device} in "
            f"{member.startup_seconds:.2f} s ({member.task.examples().train} training examples)",
            flush=True,
        )
        self.idle_timeout = idle_timeout(request)
        self.member, self.serving = member, request
        return member

    def idle(self) -> bool:
        return time.monotonic() - self.last_message > self.idle_timeout


def idle_timeout(request: WorkerRequest) -> float:
    """The run configuration's ``worker-idle-timeout``, or the default; a ValueError for a
    value that is not a positive number."""
    value = request.run_config.get(IDLE_TIMEOUT_KEY, RuntimeConfig().worker_idle_timeout)
    seconds = float(value) if isinstance(value, (int, float)) else float("nan")
    if not seconds > 0:
        raise ValueError(f"{IDLE_TIMEOUT_KEY}={value!r}: a positive number of seconds expected")
    return seconds


def member_factory(source: MemberSource) -> MemberFactory:
    """The factory ``source`` names (a ``build`` made into one); an ImportError or
    AttributeError naming what is missing."""
    module_name, _, qualname = source.target.partition(":")
    found: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    if source.kind == "factory":
        return cast(MemberFactory, found)
    build = cast(Callable[[Context], MemberParts], found)
    return lambda context, message_type, content, _: built_member(
        build, message_type, content, context
    )


def serve(directory: Path, run_id: int, factory: MemberFactory) -> str:
    """Serve until the run ends or the worker idles out; returns why it stopped."""
    os.umask(0o077)  # the socket, log and checkpoint: this user's only
    path = socket_path(directory)
    path.unlink(missing_ok=True)  # left by a worker that was killed
    worker = MemberWorker(directory, run_id, factory)
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
    parser = argparse.ArgumentParser(
        prog="python -m wash_fed.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", type=Path, required=True, help="the worker's run folder")
    parser.add_argument("--run-id", type=int, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--build", help="package.module:function -> MemberParts")
    source.add_argument("--factory", help="package.module:function -> WashMember")
    args = parser.parse_args(argv)
    named = MemberSource(args.build or args.factory, "build" if args.build else "factory")
    reason = serve(args.dir, args.run_id, member_factory(named))
    print(f"member worker {os.getpid()} stopped: {reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
