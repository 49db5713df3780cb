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
import string
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from simulations.launch import BIN, online_supernodes, run_id_in, run_status

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


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_config_arg(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


PROXY_TEMPLATE = PROJECT / "deploy" / "nginx" / "superlink.conf.template"


def render_proxy_config(
    root: Path, *, superlink: str, fleet: str, control: str, certificates: Path
) -> Path:
    """An nginx configuration under ``root`` that serves compose's proxy (the same template,
    filled in as the nginx image does) in the foreground, with its logs in ``root``.
    Addresses are ``host:port``; returns the file to pass to ``nginx -c``."""
    root.mkdir(parents=True, exist_ok=True)
    values = {
        "SUPERLINK_ADDRESS": superlink,
        "FLEET_LISTEN": fleet,
        "CONTROL_LISTEN": control,
        "CERTS": str(certificates),
    }
    (root / "superlink.conf").write_text(
        string.Template(PROXY_TEMPLATE.read_text()).substitute(values)
    )
    # As root, nginx's workers would run as `nobody`, who cannot enter a private temp folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = root / "nginx.conf"
    config.write_text(
        f"{user}daemon off;\npid {root}/nginx.pid;\nerror_log {root}/error.log info;\n"
        f"events {{}}\nhttp {{\n    access_log {root}/access.log;\n"
        f"    include {root}/superlink.conf;\n}}\n"
    )
    return config


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
        return run_id_in(self.text())


APP_PACKAGES = ("wash_fed", "server", "client")


def copy_app(target: Path) -> Path:
    """A copy of this app (its packages and pyproject.toml) in ``target``, to change and
    submit with ``flwr run <target>``."""
    ignore = shutil.ignore_patterns("__pycache__")
    for package in APP_PACKAGES:
        shutil.copytree(PROJECT / package, target / package, ignore=ignore)
    shutil.copy(PROJECT / "pyproject.toml", target / "pyproject.toml")
    return target


FAULTY_APP = PROJECT / "tests" / "e2e" / "faulty_app.py"
"""A ClientApp in which one member corrupts its replies (its docstring lists the faults)."""


def faulty_app_copy(target: Path, fault: str, member: int) -> Path:
    """A copy of this app in ``target`` whose member ``member`` commits ``fault``
    (:data:`FAULTY_APP`); every other member is honest."""
    app = copy_app(target)
    (app / "faulty").mkdir()
    (app / "faulty" / "__init__.py").write_text("")
    shutil.copy(FAULTY_APP, app / "faulty" / "app.py")
    (app / "faulty" / "fault.py").write_text(f"FAULT = {fault!r}\nMEMBER = {member}\n")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'clientapp = "client.app:app"', 'clientapp = "faulty.app:app"'
        )
    )
    return app


def results_of(run_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    return results


def wait_for_rounds(submission: Submission, runs: Path, rounds: int, timeout: float) -> Path:
    """The run's folder under ``runs``, once ``rounds`` rounds are in its results."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run_id = submission.run_id()
        found = list(runs.glob(f"*-{run_id}/results.json")) if run_id else []
        if found and len(results_of(found[0].parent)["rounds"]) >= rounds:
            return found[0].parent
        if submission.process.poll() is not None:
            raise RuntimeError(f"flwr run ended early:\n{submission.text()[-3000:]}")
        time.sleep(0.3)
    raise RuntimeError(f"{rounds} rounds did not finish in {timeout:g} s")


class FlowerHarness:
    """Owns a temporary Flower home, a SuperLink and (for deployments) SuperNodes. As a
    context manager it closes itself: every process it started is gone after the block."""

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
            # SuperExec looks for work every 0.1 s instead of every 1 s (Flower's floor: 0.01).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            MARKER: self.marker,
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.supernodes: dict[int, subprocess.Popen[bytes]] = {}
        """The SuperNode process of each partition id (the latest one started)."""
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
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
        self.write_connection(self.api_port)

    def write_connection(self, port: int) -> None:
        """The CLI's ``test`` connection: the Control API on ``port`` of 127.0.0.1."""
        if self.certificates is None:
            transport = "insecure = true\n"
        else:
            transport = f'root-certificates = "{self.certificates / "ca.crt"}"\n'
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{port}"\n{transport}'
        )

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
        self.write_connection(control)
        return fleet, control

    def register(self, public_key: Path) -> None:
        """``flwr supernode register``: the SuperLink admits the key's SuperNode."""
        done = self.flwr("supernode", "register", str(public_key), "test")
        if done.returncode != 0:
            raise RuntimeError(f"could not register {public_key}:\n{done.stdout}{done.stderr}")

    def start_supernode(
        self,
        partition: int,
        count: int,
        *,
        worker_dir: Path | None = None,
        extra_node_config: Mapping[str, Any] | None = None,
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
        entries: dict[str, Any] = {"partition-id": partition, "num-partitions": count}
        if worker_dir is not None:
            entries["worker-dir"] = str(worker_dir / f"member-{partition}")
        node_config = run_config_arg({**entries, **(extra_node_config or {})})
        args = [
            str(BIN / "flower-supernode"),
            "--superlink",
            superlink or f"127.0.0.1:{self.fleet_port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
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

    def wait_online(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the SuperLink lists ``count`` SuperNodes online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listing = self.flwr("supernode", "list", "test", "--format", "json")
            if online_supernodes(listing) >= count:
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
        app: Path = PROJECT,
    ) -> RunResult:
        """``flwr run <app> test --stream`` to the end; the run's status from ``flwr ls``."""
        submission = self.submit(run_config, federation_config=federation_config, app=app)
        return self.finish(submission, timeout)

    def submit(
        self,
        run_config: Mapping[str, Any],
        *,
        federation_config: str | None = None,
        app: Path = PROJECT,
    ) -> Submission:
        """Start ``flwr run <app> test --stream`` (this project by default) and return at
        once (see :meth:`finish`)."""
        args = [str(BIN / "flwr"), "run", str(app), "test", "--stream"]
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
        return run_status(BIN / "flwr", run_id, "test", self.env)

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

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
