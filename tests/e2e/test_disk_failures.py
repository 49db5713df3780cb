"""A disk that fills or turns read-only during a run: the run ends failed with the reason,
the launcher exits 1 without a traceback, and no file is left half-written.

The run's output folder is a small tmpfs of the test's own (root only): one too small for
the final model, and one remounted read-only after the first round.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from deploy.flwr_cli import PROJECT, run_config_arg
from deploy.processes import TINY_RUN, FlowerHarness
from wash_fed.files import write_json, write_text
from wash_fed.results import read_results

MEMBERS = 3
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"
FITS_RESULTS_NOT_MODEL = "192k"
"""Room for the results, the ledger and the server's checkpoint of a tiny run, not for its
final model (the small CNN: about 420 kB)."""


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where that is refused)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"this machine refuses a tmpfs mount: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Callable[[str], AbstractContextManager[Path]]:
    return lambda size: tmpfs(tmp_path / "disk", size)


def remount_read_only(path: Path, timeout: float = 20.0) -> None:
    """Remount ``path`` read-only, retrying while a file there is open for writing."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not remount {path} read-only: {done.stderr}")
        time.sleep(0.05)


def leftovers(folder: Path) -> list[str]:
    """Temporary files of an atomic write that were not cleaned up."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


def test_a_write_that_does_not_fit_leaves_the_old_file(
    small_disk: Callable[[str], AbstractContextManager[Path]],
) -> None:
    with small_disk("64k") as disk:
        target = disk / "results.json"
        write_json(target, {"status": "running"})
        with pytest.raises(OSError, match="No space left on device") as raised:
            write_text(target, "x" * 200_000)
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
        assert json.loads(target.read_text()) == {"status": "running"}
        assert sorted(p.name for p in disk.iterdir()) == ["results.json"]


def launch(
    harness: FlowerHarness, output: Path, log: Path, **overrides: Any
) -> subprocess.Popen[str]:
    """``python -m simulations.launch`` of a tiny WASH run into ``output``."""
    config = {
        **TINY_RUN,
        "num-members": MEMBERS,
        "output-dir": str(output),
        "member-checkpoints": str(log.parent / "members"),
        **overrides,
    }
    args = [sys.executable, "-m", "simulations.launch", "test", "--run-config"]
    args += [run_config_arg(config), "--federation-config", FEDERATION]
    with open(log, "w") as sink:
        return subprocess.Popen(
            args, env=harness.env, cwd=PROJECT, stdout=sink, stderr=subprocess.PIPE, text=True
        )


def ended(proc: subprocess.Popen[str], timeout: float = 600.0) -> str:
    """The launcher's stderr, once it has exited 1."""
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    return err


def run_folder(output: Path) -> Path:
    (folder,) = (p for p in output.iterdir() if p.is_dir())
    return folder


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_fails_the_run_with_the_reason(
    simulation_harness: FlowerHarness,
    small_disk: Callable[[str], AbstractContextManager[Path]],
    tmp_path: Path,
) -> None:
    with small_disk(FITS_RESULTS_NOT_MODEL) as disk:
        err = ended(launch(simulation_harness, disk, tmp_path / "run.log"))
        assert "finished:failed" in err and "No space left on device" in err
        folder = run_folder(disk)
        results = read_results(folder)
        assert results.status == "failed" and len(results.rounds) == 3
        assert "No space left on device" in results.error
        assert "final_model.pt" in results.error
        assert not (folder / "final_model.pt").exists()
        assert leftovers(disk) == []


@pytest.mark.slow
def test_a_folder_turned_read_only_mid_run_fails_the_run_with_the_reason(
    simulation_harness: FlowerHarness,
    small_disk: Callable[[str], AbstractContextManager[Path]],
    tmp_path: Path,
) -> None:
    rounds = 1000  # more than a loaded machine runs before the folder turns read-only
    with small_disk("8m") as disk:
        log = tmp_path / "run.log"
        proc = launch(simulation_harness, disk, log, **{"num-server-rounds": rounds})
        deadline = time.monotonic() + 300
        while not any(disk.glob("*/checkpoint.pt")):  # round 1 is on disk
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        remount_read_only(disk)
        err = ended(proc)
        assert "finished:failed" in err and "Read-only file system" in err
        assert "Read-only file system" in log.read_text()
        folder = run_folder(disk)
        results = read_results(folder)  # whole: a round's state
        assert results.status == "running" and 1 <= len(results.rounds) < rounds
        model = folder / "final_model.pt"
        assert not model.exists() or torch.load(model)["state_dict"]
        assert leftovers(disk) == []
