"""``flwr run`` that says how the run ended: the command behind ``make run``.

Flower 1.42's ``flwr run --stream`` exits 0 whatever became of the run. This launcher checks
the run configuration first (every unknown key or bad value is named, before anything
starts), streams the run's log, then reads the run's status from ``flwr ls`` and exits 0
only when it is ``finished:completed``; otherwise it prints the status and its details and
exits 1. A run whose ServerApp was killed before it could record its end gets Flower's
status in its ``results.json``.

    python -m simulations.launch [CONNECTION] [--run-config "k=v ..."] [--federation-config ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from wash_fed.config import ConfigError, WashFedConfig
from wash_fed.files import write_json
from wash_fed.keys import RESULTS_IN

__all__ = [
    "Launched",
    "check_run_config",
    "flwr_answer",
    "launch",
    "main",
    "online_supernodes",
    "results_file_in",
    "run_id_in",
    "run_status",
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
COMPLETED = "finished:completed"


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
    results = json.loads(path.read_text())
    if results.get("status") != "running":
        return False
    results["status"] = "stopped" if status == "finished:stopped" else "failed"
    results["error"] = f"the ServerApp ended without recording why; Flower: {status} {details}"
    write_json(path, results)
    return True


def flwr_answer(done: subprocess.CompletedProcess[str]) -> dict[str, Any] | None:
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


def online_supernodes(done: subprocess.CompletedProcess[str]) -> int:
    """How many SuperNodes a ``flwr supernode list --format json`` answer shows online (0
    where the command failed: :func:`flwr_answer`)."""
    answer = flwr_answer(done)
    nodes: list[dict[str, Any]] = [] if answer is None else answer.get("nodes", [])
    return sum(n.get("status") == "online" for n in nodes)


def run_status(
    flwr: Path, run_id: str, connection: str | None, env: Mapping[str, str]
) -> dict[str, Any]:
    """The run's entry in ``flwr ls --format json``."""
    args = [str(flwr), "ls", *([connection] if connection else []), "--run-id", run_id]
    done = subprocess.run(
        [*args, "--format", "json"], env=dict(env), capture_output=True, text=True
    )
    answer = flwr_answer(done)
    if answer is None:
        raise RuntimeError(f"flwr ls could not list run {run_id}: {done.stdout}{done.stderr}")
    runs: list[dict[str, Any]] = answer["runs"]
    return next(r for r in runs if r["run-id"] == run_id)


@dataclass(frozen=True)
class Launched:
    """How a launched run ended."""

    run_id: str | None
    status: str
    details: str
    output: str
    error: str = ""
    """Why the run failed, as its ``results.json`` says (empty where it says nothing)."""

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


def launch(
    *,
    connection: str | None = None,
    run_config: str = "",
    federation_config: str | None = None,
    app: Path = PROJECT,
    env: Mapping[str, str] | None = None,
    echo: bool = True,
) -> Launched:
    """``flwr run <app> [connection] --stream`` to the end; its output (echoed as it comes)
    and its final status."""
    environment = {**os.environ, **(env or {})}
    environment["PATH"] = f"{BIN}{os.pathsep}{environment.get('PATH', '')}"
    environment.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    args = [str(BIN / "flwr"), "run", str(app), *([connection] if connection else []), "--stream"]
    if run_config.strip():
        args += ["--run-config", run_config]
    if federation_config:
        args += ["--federation-config", federation_config]
    proc = subprocess.Popen(
        args, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
    proc.wait()
    output = "".join(lines)
    run_id = run_id_in(output)
    if run_id is None:
        return Launched(None, "not started", f"flwr run exited with {proc.returncode}", output)
    listing = run_status(BIN / "flwr", run_id, connection, environment)
    status, details = listing["status"], listing.get("status-details", "")
    results = results_file_in(output)
    error = ""
    try:
        if results is not None and settle_results(results, status, details):
            print(
                f"{results}: the ServerApp did not record its end; wrote {status}", file=sys.stderr
            )
        if results is not None and results.is_file():
            error = str(json.loads(results.read_text()).get("error", ""))
    except (OSError, ValueError) as err:  # a full or read-only disk, a damaged file
        print(f"{results}: could not record the run's end ({status}): {err}", file=sys.stderr)
    return Launched(run_id, status, details, output, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("connection", nargs="?", default=None, help="SuperLink connection")
    parser.add_argument("--run-config", default="", help="overrides: 'k=v ...' or a TOML file")
    parser.add_argument("--federation-config", default=None)
    args = parser.parse_args(argv)
    try:
        check_run_config(args.run_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ended = launch(
        connection=args.connection,
        run_config=args.run_config,
        federation_config=args.federation_config,
    )
    if ended.completed:
        return 0
    print(f"\nrun {ended.run_id}: {ended.status} ({ended.details})", file=sys.stderr)
    if ended.error:
        print(f"error: {ended.error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
