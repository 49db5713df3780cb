"""Real Flower processes on this machine: a SuperLink of our own (simulation or deployment,
optionally with TLS), SuperNodes, ``flwr run``, and the clean-up of every process started.

Used by the tests, by ``benchmarks/deployment_overhead.py``, and by anyone who wants the
compose topology without containers. Each instance gets its own ``FLWR_HOME``, free ports
and a unique marker in the environment of every process it starts; children inherit the
marker (Ray workers too), so :meth:`FlowerHarness.close` finds and stops all of them by
reading ``/proc`` (Linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def _flower_commands() -> Path:
    """The folder of Flower's commands: beside this interpreter, else wherever ``flwr`` is
    found on PATH (an install with ``pip --target``)."""
    here = Path(sys.executable).parent
    found = shutil.which("flwr")
    return here if (here / "flwr").exists() or found is None else Path(found).parent


BIN = _flower_commands()
PROJECT = Path(__file__).resolve().parents[1]
MARKER = "WASH_FED_TEST_HARNESS"

TINY_RUN: dict[str, Any] = {
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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_config_arg(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


@dataclass
class RunResult:
    run_id: str
    status: str
    details: str
    output: str
    listing: dict[str, Any]
    """The run's entry in ``flwr ls --format json``."""


@dataclass
class Submission:
    """A ``flwr run`` in progress and the file its output goes to."""

    process: subprocess.Popen[bytes]
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def run_id(self) -> str | None:
        """The run id, once ``flwr run`` has printed it."""
        return next(
            (
                line.split()[-1].strip(".")
                for line in self.text().splitlines()
                if "Successfully started run" in line
            ),
            None,
        )


class FlowerHarness:
    """Owns a temporary Flower home, a SuperLink and (for deployments) SuperNodes."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.marker = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            # Flower's processes start each other by name (flower-superexec, ...).
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            MARKER: self.marker,
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.supernodes: dict[int, subprocess.Popen[bytes]] = {}
        """The SuperNode process of each partition id (the latest one started)."""
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.control_port = free_port()
        self.api_port = free_port()
        self.certificates: Path | None = None

    # --- processes ----------------------------------------------------------------------

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(proc)
        return proc

    def start_superlink(self, *, simulation: bool, certificates: Path | None = None) -> None:
        """A SuperLink on free loopback ports; TLS when ``certificates`` (a folder made by
        deploy/certs/generate.sh) is given. Writes the ``test`` connection for the CLI."""
        args = [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--database",
            str(self.home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        if certificates is None:
            args.append("--insecure")
            transport = "insecure = true\n"
        else:
            args += [
                f"--ssl-ca-certfile={certificates / 'ca.crt'}",
                f"--ssl-certfile={certificates / 'server.pem'}",
                f"--ssl-keyfile={certificates / 'server.key'}",
            ]
            transport = f'root-certificates = "{certificates / "ca.crt"}"\n'
        if simulation:
            args += ["--simulation", "--isolation", "subprocess"]
        self.start("superlink", args)
        self.wait_healthy(self.api_port, "SuperLink", tls=certificates is not None)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{self.api_port}"\n{transport}'
        )
        self.certificates = certificates

    def start_supernode(
        self,
        partition: int,
        count: int,
        *,
        worker_dir: Path | None = None,
        extra_node_config: Mapping[str, Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        """SuperNode ``partition`` of ``count`` on a free port. With ``worker_dir``, its
        member lives in a member worker under ``worker_dir/member-<partition>``;
        ``extra_node_config`` adds node config entries (e.g. ``data-path``)."""
        entries: dict[str, Any] = {"partition-id": partition, "num-partitions": count}
        if worker_dir is not None:
            entries["worker-dir"] = str(worker_dir / f"member-{partition}")
        node_config = run_config_arg({**entries, **(extra_node_config or {})})
        args = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.api_port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        ]
        if self.certificates is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.certificates / "ca.crt")]
        proc = self.start(f"supernode-{partition}", args)
        self.supernodes[partition] = proc
        return proc

    def start_supernodes(self, count: int, *, worker_dir: Path | None = None) -> None:
        """``count`` SuperNodes with partition ids 0..count-1, online when this returns."""
        for i in range(count):
            self.start_supernode(i, count, worker_dir=worker_dir)
        self.wait_online(count)

    def wait_online(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the SuperLink lists ``count`` SuperNodes online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.flwr("supernode", "list", "test", "--format", "json")
            if done.returncode == 0:
                nodes = json.loads(done.stdout).get("nodes", [])
                if sum(n.get("status") == "online" for n in nodes) >= count:
                    return
            time.sleep(1.0)
        raise RuntimeError(f"{count} SuperNodes did not come online:\n{self.describe()}")

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

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run(
        self,
        run_config: Mapping[str, Any],
        *,
        federation_config: str | None = None,
        timeout: float = 600.0,
    ) -> RunResult:
        """``flwr run . test --stream`` to the end; the run's status from ``flwr ls``."""
        return self.finish(self.submit(run_config, federation_config=federation_config), timeout)

    def submit(
        self, run_config: Mapping[str, Any], *, federation_config: str | None = None
    ) -> Submission:
        """Start ``flwr run . test --stream`` and return at once (see :meth:`finish`)."""
        args = [str(BIN / "flwr"), "run", ".", "test", "--stream"]
        args += ["--run-config", run_config_arg(run_config)]
        if federation_config:
            args += ["--federation-config", federation_config]
        output = self.logs / f"flwr-run-{uuid.uuid4().hex[:8]}.log"
        with open(output, "wb") as sink:
            proc = subprocess.Popen(
                args, env=self.env, cwd=PROJECT, stdout=sink, stderr=subprocess.STDOUT
            )
        return Submission(proc, output)

    def finish(self, submission: Submission, timeout: float = 600.0) -> RunResult:
        """Wait for a submitted ``flwr run``; the run's status from ``flwr ls``."""
        try:
            submission.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            submission.process.kill()
            raise RuntimeError(
                f"flwr run took more than {timeout:g} s:\n{submission.text()[-4000:]}"
            ) from None
        output = submission.text()
        run_id = submission.run_id()
        if run_id is None:
            raise RuntimeError(f"flwr run did not start a run:\n{output}")
        listing = self.listing(run_id)
        return RunResult(
            run_id, listing["status"], listing.get("status-details", ""), output, listing
        )

    def listing(self, run_id: str) -> dict[str, Any]:
        done = self.flwr("ls", "test", "--run-id", run_id, "--format", "json")
        runs = json.loads(done.stdout)["runs"]
        found: dict[str, Any] = next(r for r in runs if r["run-id"] == run_id)
        return found

    def close(self) -> None:
        """Stop every process this harness started, and every process that inherited it."""
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in self.descendants():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

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

    def describe(self) -> str:
        """The last lines of every log, for assertion messages."""
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


class Prometheus:
    """A real ``prometheus`` (Debian's binary) on loopback, scraping one target every second."""

    def __init__(self, root: Path, target_port: int) -> None:
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: wash-fed\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=open(root / "prometheus.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("prometheus did not become ready")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API: the result vector."""
        return self._api("query", {"query": promql})

    def query_range(
        self, promql: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """A range query through the HTTP API: one series of ``[time, value]`` per labels."""
        return self._api("query_range", {"query": promql, "start": start, "end": end, "step": step})

    def _api(self, endpoint: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/{endpoint}", params=params)
        response.raise_for_status()
        body = response.json()
        if body["status"] != "success":
            raise RuntimeError(f"Prometheus answered {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)
