"""The link between a ClientApp and its node's member worker; torch-free.

The worker (:mod:`wash_fed.worker`) is one long-lived process per member and run. It listens
on a Unix socket, ``<worker-dir>/run-<run id>/worker.sock``, in directories only the
SuperNode's user can enter (mode 0700), so nobody else on the machine can drive it. A
request is one gRPC call (grpcio, generic handlers, no generated code) whose body is a
Flower ``RecordDict`` in Flower's own protobuf form: the message's content plus three
``worker.*`` records naming the message type and carrying the run and node configuration.
The reply is the reply's content in the same form; a failure is a gRPC error whose details
are the worker's own words.

:func:`forward` is all the ClientApp calls: it starts the worker on the node's first
message of a run (or after the worker died) and waits until it listens. The worker builds its
member with the function a :class:`MemberSource` names by import path, and imports it from
the app's own code: the folder that holds the function's top-level package comes first on
the worker's ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from flwr.app import ConfigRecord, RecordDict, UserConfigValue
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

__all__ = [
    "METHOD",
    "SERVICE",
    "MemberSource",
    "WorkerError",
    "WorkerRequest",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "forward",
    "run_directory",
    "socket_path",
]

SERVICE = "wash_fed.MemberWorker"
METHOD = f"/{SERVICE}/Handle"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
START_TIMEOUT = 180.0
"""Seconds a new worker may take to listen (it imports torch and loads the data)."""

_REQUEST = "worker.request"
_RUN_CONFIG = "worker.run-config"
_NODE_CONFIG = "worker.node-config"
_MESSAGE_TYPE = "message-type"
_RUN_ID = "run-id"
_UNIX_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL


class WorkerError(RuntimeError):
    """The member worker could not be started, or it failed a message (in its own words)."""


@dataclass(frozen=True)
class MemberSource:
    """The function a member worker builds its member with, by import path
    (``package.module:function``): a ``build`` as :func:`wash_fed.member_app.wash_client_app`
    takes one (``Context -> MemberParts``), or a ``factory`` of a whole member
    (:data:`wash_fed.worker.MemberFactory`: the built-in app's, with its checkpoints)."""

    target: str
    kind: Literal["build", "factory"]

    @classmethod
    def of(cls, function: object, kind: Literal["build", "factory"]) -> MemberSource:
        """The source naming ``function``, which must be importable: defined at a module's
        top level (a ValueError otherwise, when a worker would need it)."""
        module = getattr(function, "__module__", None)
        name = getattr(function, "__qualname__", "")
        if not module or module == "__main__" or "<" in name:
            raise ValueError(
                f"a member worker imports the function that builds its member by name; "
                f"{module}:{name} cannot be imported: define it at a module's top level"
            )
        return cls(f"{module}:{name}", kind)

    @property
    def app_root(self) -> Path:
        """The folder that holds the function's top-level package (or module)."""
        top = self.target.partition(":")[0].split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin is None:
            raise WorkerError(f"cannot find {top!r}, which a member worker needs to import")
        origin = Path(spec.origin).resolve()
        return origin.parent.parent if spec.submodule_search_locations else origin.parent

    def arguments(self) -> list[str]:
        """The worker's command-line arguments that name this source."""
        return [f"--{self.kind}", self.target]


@dataclass(frozen=True)
class WorkerRequest:
    """One message for the worker: its type, the run it belongs to, and its content."""

    message_type: str
    run_id: int
    run_config: Mapping[str, UserConfigValue]
    node_config: Mapping[str, UserConfigValue]
    content: RecordDict


def encode_request(request: WorkerRequest) -> bytes:
    envelope = RecordDict(dict(request.content.items()))
    envelope[_REQUEST] = ConfigRecord(
        {_MESSAGE_TYPE: request.message_type, _RUN_ID: str(request.run_id)}
    )
    envelope[_RUN_CONFIG] = ConfigRecord(dict(request.run_config))
    envelope[_NODE_CONFIG] = ConfigRecord(dict(request.node_config))
    return bytes(recorddict_to_proto(envelope).SerializeToString())


def decode_request(body: bytes) -> WorkerRequest:
    proto = ProtoRecordDict()
    proto.ParseFromString(body)
    envelope = recorddict_from_proto(proto)
    header = envelope.config_records[_REQUEST]
    request = WorkerRequest(
        message_type=str(header[_MESSAGE_TYPE]),
        run_id=int(str(header[_RUN_ID])),
        run_config=_user_config(envelope.config_records[_RUN_CONFIG]),
        node_config=_user_config(envelope.config_records[_NODE_CONFIG]),
        content=RecordDict(
            {k: v for k, v in envelope.items() if k not in (_REQUEST, _RUN_CONFIG, _NODE_CONFIG)}
        ),
    )
    return request


def _user_config(record: ConfigRecord) -> dict[str, UserConfigValue]:
    """A run or node configuration as it travelled in a request (scalars only)."""
    values = {}
    for key, value in record.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"configuration key {key!r} holds {type(value).__name__}")
        values[key] = value
    return values


def encode_reply(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def decode_reply(body: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(body)
    return recorddict_from_proto(proto)


def run_directory(worker_dir: Path | str, run_id: int) -> Path:
    """The worker's folder for run ``run_id``: its socket, log, pid file and checkpoint."""
    return Path(worker_dir).expanduser().resolve() / f"run-{run_id}"


def socket_path(directory: Path) -> Path:
    path = directory / "worker.sock"
    if len(str(path)) > _UNIX_PATH_MAX:
        raise WorkerError(
            f"the worker socket path {path} is longer than {_UNIX_PATH_MAX} characters; "
            "choose a shorter worker-dir in the node config"
        )
    return path


def _private_directory(path: Path) -> None:
    """Create ``path`` (and missing parents) and make it reachable by this user only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    if path.stat().st_uid != os.getuid():
        raise WorkerError(f"{path} belongs to another user; the worker will not use it")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, so that one process at a time starts a worker."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _listening(channel: grpc.Channel, timeout: float) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    return True


def _start_worker(directory: Path, run_id: int, source: MemberSource) -> None:
    """Start the worker detached from this process (it outlives the ClientApp) and wait
    until it listens. The worker runs the app's own code: the folder that holds the
    package of ``source`` comes first on its path."""
    app_root = source.app_root
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(app_root), os.environ.get("PYTHONPATH", "")]),
    }
    log_path = directory / "worker.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wash_fed.worker",
                "--dir",
                str(directory),
                "--run-id",
                str(run_id),
                *source.arguments(),
            ],
            cwd=app_root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    target = f"unix:{socket_path(directory)}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise WorkerError(
                f"the member worker exited with code {process.returncode}:\n" + "\n".join(tail)
            )
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            if _listening(channel, timeout=0.5):
                return
    raise WorkerError(f"the member worker did not listen within {START_TIMEOUT:.0f} s ({log_path})")


def forward(
    worker_dir: Path | str,
    source: MemberSource,
    message_type: str,
    content: RecordDict,
    run_id: int,
    run_config: Mapping[str, UserConfigValue],
    node_config: Mapping[str, UserConfigValue],
) -> RecordDict:
    """Have this node's member worker handle one message; start it first if needed (with
    its member built by ``source``).

    Returns the reply content; raises :class:`WorkerError` with the worker's reason.
    """
    directory = run_directory(worker_dir, run_id)
    _private_directory(directory.parent)
    _private_directory(directory)
    target = f"unix:{socket_path(directory)}"
    request = WorkerRequest(message_type, run_id, dict(run_config), dict(node_config), content)
    with _locked(directory / "start.lock"):
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            listening = _listening(channel, timeout=0.5)
        if not listening:
            _start_worker(directory, run_id, source)
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        try:
            body = call(encode_request(request))
        except grpc.RpcError as err:
            raise WorkerError(
                f"member worker ({directory}): {err.code().name}: {err.details()}"
            ) from None
    return decode_reply(body)
