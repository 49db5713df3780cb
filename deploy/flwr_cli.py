"""Flower's ``flwr`` command, the one place this project talks to it: the environment every
Flower process of ours runs with, connections in ``$FLWR_HOME/config.toml``, ``flwr run``
(submitted, followed, finished), a run's status and traffic from ``flwr ls``, and what
Flower's JSON answers mean.

The launcher (``make run``), the local process harness (:mod:`deploy.processes`), the compose
stack (:mod:`deploy.stack`) and the network namespaces (:mod:`deploy.namespaces`) all go
through :class:`FlowerCli`, so they submit, wait and read a run's end the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from uuid import uuid4

import tomli_w
from flwr.common.config import parse_config_args

from wash_fed.config import ConfigError, ConfigValue, WashFedConfig, toml_value
from wash_fed.keys import RESULTS_IN
from wash_fed.results import read_results, write_results

__all__ = [
    "BIN",
    "COMPLETED",
    "PROJECT",
    "FlowerCli",
    "FlwrError",
    "FlwrRun",
    "Submission",
    "check_run_config",
    "flower_env",
    "flwr_answer",
    "online_supernodes",
    "results_file_in",
    "run_config_arg",
    "run_id_in",
    "settle_results",
]


def _flower_commands() -> Path:
    """The folder of Flower's commands: beside this interpreter, else wherever ``flwr`` is
    found on PATH (an install with ``pip --target``)."""
    here = Path(sys.executable).parent
    found = shutil.which("flwr")
    return here if (here / "flwr").exists() or found is None else Path(found).parent


BIN = _flower_commands()
PROJECT = Path(__file__).resolve().parents[1]
"""This project's folder: the app ``flwr run`` submits unless told another."""
COMPLETED = "finished:completed"
FLOWER_SETTINGS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # The app's dependencies are installed; Flower must not build an environment of its own.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""What every Flower process this project starts runs with."""


class FlwrError(RuntimeError):
    """A ``flwr`` command failed, or a run did not start or end in time; the message says
    what it printed."""


def flower_env(home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for Flower's processes: Flower's commands first on
    ``PATH`` (they start each other by name), :data:`FLOWER_SETTINGS`, ``FLWR_HOME`` when
    ``home`` is given, and ``extra``."""
    env = {**os.environ, **FLOWER_SETTINGS, **(extra or {})}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if home is not None:
        env["FLWR_HOME"] = str(home.expanduser())
    return env


def run_config_arg(values: Mapping[str, ConfigValue]) -> str:
    """``values`` as ``flwr run --run-config`` (and ``--node-config``) take them."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def check_run_config(overrides: str, app: Path = PROJECT) -> WashFedConfig:
    """The configuration ``--run-config`` would give the app: its pyproject defaults with
    ``overrides`` (``k=v`` pairs or a TOML file). Raises ConfigError naming what is wrong."""
    defaults = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    try:
        given = parse_config_args([overrides]) if overrides.strip() else {}
    except ValueError as err:
        raise ConfigError(f"--run-config {overrides!r}: {err}") from None
    return WashFedConfig.from_mapping({**defaults, **given})


def run_id_in(output: str) -> str | None:
    """The run id ``flwr run`` prints when it starts a run."""
    for line in output.splitlines():
        if "Successfully started run" in line:
            return line.split()[-1].strip(".")
    return None


def results_file_in(output: str) -> Path | None:
    """The run's results.json, named in the ServerApp's first log line."""
    for line in output.splitlines():
        if RESULTS_IN in line:
            return Path(line.split(RESULTS_IN, 1)[1].strip()) / "results.json"
    return None


def settle_results(path: Path, status: str, details: str) -> bool:
    """A ServerApp killed before it could record its end leaves its results "running": write
    the end Flower saw (``stopped``, else ``failed``). Whether the file was changed; raises
    ``OSError`` when it could not be read or written."""
    if not path.is_file() or not status.startswith("finished:"):
        return False
    results = read_results(path)
    if results.status != "running":
        return False
    results.status = "stopped" if status == "finished:stopped" else "failed"
    results.error = f"the ServerApp ended without recording why; Flower: {status} {details}"
    write_results(path, results)
    return True


JsonObject = Mapping[str, object]


def flwr_answer(done: subprocess.CompletedProcess[str]) -> JsonObject | None:
    """What a ``flwr ... --format json`` command answered, or None where it failed.

    Flower's CLI exits 0 with ``{"success": false, "error-message": ...}`` where the
    SuperLink could not be reached (a proxy's 502 included), so the exit code alone
    does not say the command worked."""
    if done.returncode != 0:
        return None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or answer.get("success") is False:
        return None
    return answer


def _objects(answer: JsonObject | None, key: str) -> list[JsonObject]:
    """The JSON objects listed under ``key`` of an answer (none where it failed)."""
    listed = [] if answer is None else answer.get(key, [])
    return [item for item in listed if isinstance(item, dict)] if isinstance(listed, list) else []


def online_supernodes(done: subprocess.CompletedProcess[str]) -> int:
    """How many SuperNodes a ``flwr supernode list --format json`` answer shows online (0
    where the command failed: :func:`flwr_answer`)."""
    return sum(node.get("status") == "online" for node in _objects(flwr_answer(done), "nodes"))


@dataclass(frozen=True)
class FlwrRun:
    """How a ``flwr run`` ended, as the SuperLink lists it (``flwr ls``)."""

    run_id: str
    status: str
    """``finished:completed`` for a run that completed (:attr:`completed`)."""
    details: str
    output: str
    """What ``flwr run --stream`` printed."""
    inbound_bytes: int = 0
    """Flower's own count of the Fleet API's payloads up (0 in simulation)."""
    outbound_bytes: int = 0
    """... and down."""
    error: str = ""
    """Why the run failed, as its ``results.json`` says (the launcher reads it)."""

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


class Submission:
    """A ``flwr run --stream`` in progress: its output as it comes (kept, copied to ``log``
    when given, echoed when ``echo``)."""

    def __init__(
        self, process: subprocess.Popen[str], log: Path | None = None, echo: bool = False
    ) -> None:
        self.process = process
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(log, echo), daemon=True)
        self._reader.start()

    def _read(self, log: Path | None, echo: bool) -> None:
        assert self.process.stdout is not None
        sink: IO[str] | None = open(log, "a") if log else None  # noqa: SIM115
        try:
            for line in self.process.stdout:
                self._lines.append(line)
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if echo:
                    print(line, end="", flush=True)
        finally:
            if sink is not None:
                sink.close()

    def text(self) -> str:
        return "".join(self._lines)

    def run_id(self) -> str | None:
        """The run id, once ``flwr run`` has printed it."""
        return run_id_in(self.text())

    def wait(self, timeout: float) -> str:
        """Wait for ``flwr run`` to exit; all it printed. FlwrError (the process killed)
        after ``timeout`` seconds."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self._reader.join(timeout=10)
            raise FlwrError(
                f"flwr run took more than {timeout:g} s:\n{self.text()[-4000:]}"
            ) from None
        self._reader.join()
        return self.text()


class FlowerCli:
    """The ``flwr`` command against one SuperLink connection (``None``: the default one of
    ``$FLWR_HOME/config.toml``), with a Flower home of its own when ``home`` is given."""

    def __init__(
        self,
        home: Path | None,
        connection: str | None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.connection = connection
        self.env = flower_env(home, extra_env)
        self.home = Path(self.env.get("FLWR_HOME", "~/.flwr")).expanduser()
        self.run_logs: Path | None = None
        """Where each submitted run's output is also written (``flwr-run-<id>.log``)."""

    def describe(self) -> str:
        """What the processes behind the connection logged lately, for error messages
        (nothing here: a deployment that has logs says)."""
        return ""

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``flwr <args>``, its output captured."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _on_connection(self, *args: str) -> list[str]:
        return [*args, *([self.connection] if self.connection else [])]

    def write_connection(self, address: str, root_certificates: Path | None = None) -> None:
        """This CLI's connection in ``config.toml``: ``address`` (the Control API), over TLS
        with ``root_certificates`` or else insecure. Other connections are kept; where the
        file names no default, the connection becomes it."""
        if self.connection is None:
            raise FlwrError("a connection of the default name cannot be written")
        config = self.home / "config.toml"
        settings = tomllib.loads(config.read_text()) if config.exists() else {}
        superlink = settings.setdefault("superlink", {})
        entry: dict[str, str | bool] = {"address": address}
        if root_certificates is None:
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(root_certificates)
        superlink[self.connection] = entry
        superlink.setdefault("default", self.connection)
        self.home.mkdir(parents=True, exist_ok=True)
        config.write_text(tomli_w.dumps(settings))

    def register(self, public_key: Path) -> None:
        """``flwr supernode register``: the SuperLink admits the key's SuperNode (a key
        registered before is fine)."""
        done = self.flwr(*self._on_connection("supernode", "register", str(public_key)))
        text = done.stdout + done.stderr
        if done.returncode != 0 and "already" not in text.lower():
            raise FlwrError(f"could not register {public_key}: {text[-800:]}\n{self.describe()}")

    def online(self) -> int:
        """How many SuperNodes the SuperLink lists online (0 where it does not answer)."""
        listing = self.flwr(*self._on_connection("supernode", "list"), "--format", "json")
        return online_supernodes(listing)

    def wait_online(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` SuperNodes are online; FlwrError with what the processes logged
        (:meth:`describe`) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.online() < count:
            if time.monotonic() > deadline:
                raise FlwrError(f"{count} SuperNodes did not come online:\n{self.describe()}")
            time.sleep(1.0)

    def answers(self) -> bool:
        """Whether the SuperLink answers through this connection (``flwr ls`` succeeds)."""
        done = self.flwr(*self._on_connection("ls"), "--format", "json", timeout=30)
        return flwr_answer(done) is not None

    def submit(
        self,
        run_config: Mapping[str, ConfigValue] | str,
        *,
        app: Path = PROJECT,
        federation_config: str | None = None,
        echo: bool = False,
    ) -> Submission:
        """Start ``flwr run <app> [connection] --stream`` and return at once (see
        :meth:`finish`). ``run_config``: overrides, as values or as ``--run-config`` text;
        ``echo``: print the output as it comes."""
        overrides = run_config if isinstance(run_config, str) else run_config_arg(run_config)
        args = [str(BIN / "flwr"), "run", str(app), *self._on_connection(), "--stream"]
        if overrides.strip():
            args += ["--run-config", overrides]
        if federation_config:
            args += ["--federation-config", federation_config]
        process = subprocess.Popen(
            args,
            env=self.env,
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        log = None if self.run_logs is None else self.run_logs / f"flwr-run-{uuid4().hex[:8]}.log"
        return Submission(process, log, echo)

    def finish(self, submission: Submission, timeout: float = 600.0) -> FlwrRun:
        """Wait for a submitted ``flwr run``; how the run ended, from ``flwr ls``."""
        output = submission.wait(timeout)
        run_id = run_id_in(output)
        if run_id is None:
            code = submission.process.returncode
            raise FlwrError(f"flwr run started no run (it exited with {code}):\n{output[-3000:]}")
        return self.status(run_id, output)

    def run(
        self,
        run_config: Mapping[str, ConfigValue] | str,
        *,
        app: Path = PROJECT,
        federation_config: str | None = None,
        timeout: float = 600.0,
        echo: bool = False,
    ) -> FlwrRun:
        """``flwr run`` to the end (:meth:`submit`, then :meth:`finish`)."""
        submission = self.submit(
            run_config, app=app, federation_config=federation_config, echo=echo
        )
        return self.finish(submission, timeout)

    def status(self, run_id: str, output: str = "") -> FlwrRun:
        """Run ``run_id`` as ``flwr ls`` lists it (``output``: what ``flwr run`` printed)."""
        done = self.flwr(*self._on_connection("ls"), "--run-id", run_id, "--format", "json")
        listed = [r for r in _objects(flwr_answer(done), "runs") if r.get("run-id") == run_id]
        if not listed:
            raise FlwrError(f"flwr ls could not list run {run_id}: {done.stdout}{done.stderr}")
        (run,) = listed
        traffic = run.get("network-traffic", {})
        traffic = traffic if isinstance(traffic, dict) else {}
        return FlwrRun(
            run_id,
            str(run["status"]),
            str(run.get("status-details", "")),
            output,
            inbound_bytes=int(traffic.get("inbound-bytes", 0)),
            outbound_bytes=int(traffic.get("outbound-bytes", 0)),
        )
