"""Shared fixtures. Data tests use the real Fashion-MNIST, prepared by `make data`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.local_flower import FlowerHarness
from wash_fed.data import DatasetNotFoundError, ImageData, load_split


@pytest.fixture(scope="session")
def fashion_train() -> ImageData:
    try:
        return load_split("fashion-mnist", train=True)
    except DatasetNotFoundError as err:  # make test prepares it; a bare pytest may not have
        pytest.fail(f"Fashion-MNIST is needed: {err}")


@pytest.fixture(scope="module")
def simulation_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerHarness]:
    """A simulation SuperLink of the test module's own; every process it started is gone
    after the module."""
    harness = FlowerHarness(tmp_path_factory.mktemp("flwr-home"))
    try:
        harness.start_superlink(simulation=True)
        yield harness
    finally:
        harness.close()
    assert harness.descendants() == [], "processes survived the harness"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path: a Unix socket's path has at most 107 characters."""
    path = Path(tempfile.mkdtemp(prefix="wf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
