"""A Flower deployment as local processes: a SuperLink of our own (simulation or deployment,
optionally with TLS, SuperNode authentication and the compose stack's proxy in front),
SuperNodes (optionally with member workers, or in network namespaces), ``flwr run`` through
it, and the clean-up of every process started.

Used by the tests, the benchmarks and the network-namespace deployment
(:mod:`deploy.namespaces`). Each harness gets its own ``FLWR_HOME``, free ports and a unique
marker in the environment of every process it starts; children inherit the marker (Ray
workers too), so :meth:`FlowerHarness.close` finds and stops all of them by reading
``/proc`` (Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import httpx

from deploy.flwr_cli import BIN, FlowerCli, Submission, run_config_arg
from deploy.proxy import render_proxy_config
from wash_fed.config import ConfigValue
from wash_fed.keys import NodeConfig
from wash_fed.results import read_results

__all__ = ["TINY_RUN", "FlowerHarness", "free_port", "wait_for_rounds"]

MARKER = "WASH_FED_TEST_HARNESS"
CONNECTION = "test"
"""The harness's connection in its own ``config.toml``."""

TINY_RUN: dict[str, ConfigValue] = {
    "num-server-rounds": 3,
    "local-steps": 5,
    "batch-size": 64,
    "train-subset": 3000,
    "holdout-size": 300,
    "test-subset": 500,
    "eval-every": 0,
    "bn-batches": 4,
    "poll-interval": 0.2,
}
"""A run that takes seconds per round on a CPU: for tests and benchmarks of the machinery
(its accuracies mean nothing). Override what a check needs."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_rounds(submission: Submission, runs: Path, rounds: int, timeout: float) -> Path:
    """The run's folder under ``runs``, once ``rounds`` rounds are in its results."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run_id = submission.run_id()
        found = list(runs.glob(f"*-{run_id}/results.json")) if run_id else []
        if found and len(read_results(found[0]).rounds) >= rounds:
            return found[0].parent
        if submission.process.poll() is not None:
            raise RuntimeError(f"flwr run ended early:\n{submission.text()[-3000:]}")
        time.sleep(0.3)
    raise RuntimeError(f"{rounds} rounds did not finish in {timeout:g} s")


class FlowerHarness(FlowerCli):
    """Owns a temporary Flower home, a SuperLink and (for deployments) SuperNodes, and is
    the ``flwr`` CLI of its ``test`` connection. As a context manager it closes itself:
    every process it started is gone after the block."""

    def __init__(self, home: Path) -> None:
        self.marker = uuid.uuid4().hex
        super().__init__(
            home,
            CONNECTION,
            {
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                # SuperExec looks for work every 0.1 s instead of every 1 s (Flower's floor:
                # 0.01).
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                MARKER: self.marker,
            },
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        self.supernodes: dict[int, subprocess.Popen[bytes]] = {}
        """The SuperNode process of each partition id (the latest one started)."""
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_logs = self.logs
        self.api_port = free_port()
        self.fleet_port = self.api_port
        """Where SuperNodes connect: the SuperLink's port, or the proxy's fleet port."""
        self.certificates: Path | None = None

    def __enter__(self) -> FlowerHarness:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- processes ----------------------------------------------------------------------

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        # In the harness's home, not this checkout: Ray's workers (simulated members) put
        # the SuperLink's working directory first on their import path.
        proc = subprocess.Popen(
            args,
            env=self.env,
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def start_superlink(
        self,
        *,
        simulation: bool,
        certificates: Path | None = None,
        supernode_auth: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        """A SuperLink on a free port of ``host`` (loopback by default); TLS when
        ``certificates`` (a folder made by deploy/certs/generate.sh) is given, admitting
        only registered SuperNodes when ``supernode_auth``. Writes the ``test`` connection
        for the CLI."""
        args = [
            str(BIN / "flower-superlink"),
            "--host",
            host,
            "--port",
            str(self.api_port),
            "--database",
            str(self.home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        if certificates is None:
            args.append("--insecure")
        else:
            args += [
                f"--ssl-ca-certfile={certificates / 'ca.crt'}",
                f"--ssl-certfile={certificates / 'server.pem'}",
                f"--ssl-keyfile={certificates / 'server.key'}",
            ]
            if supernode_auth:
                args.append("--enable-supernode-auth")
        if simulation:
            args += ["--simulation", "--isolation", "subprocess"]
        self.start("superlink", args)
        self.wait_healthy(self.api_port, "SuperLink", tls=certificates is not None)
        self.certificates = certificates
        self.connect(self.api_port)

    def connect(self, port: int) -> None:
        """The CLI's ``test`` connection: the Control API on ``port`` of 127.0.0.1."""
        ca = None if self.certificates is None else self.certificates / "ca.crt"
        self.write_connection(f"127.0.0.1:{port}", ca)

    def start_proxy(self) -> tuple[int, int]:
        """Compose's nginx proxy in front of the (TLS) SuperLink: SuperNodes connect to its
        fleet port from then on, and the CLI to its control port. Returns both ports."""
        if self.certificates is None:
            raise RuntimeError("the proxy speaks TLS: start the SuperLink with certificates")
        fleet, control = free_port(), free_port()
        config = render_proxy_config(
            self.home / "proxy",
            superlink=f"127.0.0.1:{self.api_port}",
            fleet=f"127.0.0.1:{fleet}",
            control=f"127.0.0.1:{control}",
            certificates=self.certificates,
        )
        self.start("proxy", ["nginx", "-p", str(config.parent), "-c", str(config)])
        deadline = time.monotonic() + 30
        while not all(_listening(p) for p in (fleet, control)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy did not start:\n{self.describe()}")
            time.sleep(0.2)
        self.fleet_port = fleet
        self.connect(control)
        return fleet, control

    def start_supernode(
        self,
        partition: int,
        count: int,
        *,
        worker_dir: Path | None = None,
        extra_node_config: Mapping[str, ConfigValue] | None = None,
        auth_key: Path | None = None,
        name: str | None = None,
        superlink: str | None = None,
        netns: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """SuperNode ``partition`` of ``count`` on a free port. With ``worker_dir``, its
        member lives in a member worker under ``worker_dir/member-<partition>``;
        ``extra_node_config`` adds node config entries (e.g. ``data-path``); ``auth_key`` is
        its private key where the SuperLink authenticates SuperNodes. Its log is
        ``<name>.log`` (default ``supernode-<partition>``). ``superlink`` is the address it
        connects to (default: this harness's SuperLink or proxy on loopback); ``netns`` a
        network namespace to run it in (``ip netns exec``; root only)."""
        entries: dict[str, ConfigValue] = {
            NodeConfig.PARTITION_ID: partition,
            NodeConfig.NUM_PARTITIONS: count,
        }
        if worker_dir is not None:
            entries[NodeConfig.WORKER_DIR] = str(worker_dir / f"member-{partition}")
        args = [
            str(BIN / "flower-supernode"),
            "--superlink",
            superlink or f"127.0.0.1:{self.fleet_port}",
            "--port",
            str(free_port()),
            "--node-config",
            run_config_arg({**entries, **(extra_node_config or {})}),
        ]
        if self.certificates is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.certificates / "ca.crt")]
        if auth_key is not None:
            args += ["--auth-supernode-private-key", str(auth_key)]
        if netns is not None:
            args = ["ip", "netns", "exec", netns, *args]
        proc = self.start(name or f"supernode-{partition}", args)
        if name is None:
            self.supernodes[partition] = proc
        return proc

    def start_supernodes(self, count: int, *, worker_dir: Path | None = None) -> None:
        """``count`` SuperNodes with partition ids 0..count-1, online when this returns."""
        for i in range(count):
            self.start_supernode(i, count, worker_dir=worker_dir)
        self.wait_online(count)

    def wait_healthy(
        self, port: int, what: str, *, tls: bool = False, timeout: float = 60.0
    ) -> None:
        deadline = time.monotonic() + timeout
        scheme = "https" if tls else "http"
        while time.monotonic() < deadline:
            try:
                if httpx.get(
                    f"{scheme}://127.0.0.1:{port}/health", timeout=1.0, verify=False
                ).is_success:
                    return
            except httpx.HTTPError:
                pass
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.3)
        raise RuntimeError(f"{what} on port {port} did not become healthy; logs in {self.logs}")

    def close(self, grace: float = 15.0, bound: float = 120.0) -> None:
        """Stop every process this harness started, and every process that inherited it.

        Each started process gets SIGTERM and ``grace`` seconds to exit, then SIGKILL. The
        processes that inherited the marker are then killed until none is left: a loaded
        machine delays their exit (and a dying Ray may still start one) without failing
        the close. Raises only when some survive ``bound`` seconds of that."""
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=bound)
        deadline = time.monotonic() + bound
        while survivors := self.descendants():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {survivors} survived SIGKILL for {bound:g} s")
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def descendants(self) -> list[int]:
        """Live processes carrying this harness's marker in their environment."""
        needle = f"{MARKER}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def describe(self, *more: Path) -> str:
        """The last lines of every log, and of every ``*.log`` under the folders ``more``
        (member workers' folders), for assertion messages."""
        logs = sorted(self.logs.glob("*.log"))
        for folder in more:
            logs += sorted(folder.rglob("*.log"))
        parts = []
        for log in logs:
            lines = log.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {log}\n" + "\n".join(lines))
        return "\n".join(parts)
