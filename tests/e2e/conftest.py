"""Fixtures of the end-to-end lane: real Flower processes on this machine."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from deploy.engine import TEST_STACKS, log, remove_named
from deploy.processes import FlowerHarness


@pytest.fixture(scope="module")
def simulation_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerHarness]:
    """A simulation SuperLink of the test module's own; every process it started is gone
    after the module (the harness's close raises where one survives)."""
    with FlowerHarness(tmp_path_factory.mktemp("flwr-home")) as harness:
        harness.start_superlink(simulation=True)
        yield harness


@pytest.fixture(scope="module")
def one_stack_at_a_time() -> Iterator[None]:
    """The compose stacks on this machine share the published ports and deploy/certs: one
    test module's stack at a time (another test process waits for it). Whatever a killed
    test run left (containers holding the ports, volumes holding checkpoints, networks) is
    removed first: while the lock is held, no other test's stack is running."""
    with FileLock(Path(tempfile.gettempdir()) / "wash-fed-compose-stack.lock"):
        cli = shutil.which("podman") or shutil.which("docker")
        if cli is not None:
            left = remove_named(cli, TEST_STACKS)
            if left:
                log(f"removed what an earlier test run left: {', '.join(left)}")
        yield
