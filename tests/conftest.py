"""Fixtures of both lanes. Data tests use the real Fashion-MNIST, prepared by `make data`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wash_fed.data import DatasetNotFoundError, ImageData, load_split


@pytest.fixture(scope="session")
def fashion_train() -> ImageData:
    try:
        return load_split("fashion-mnist", train=True)
    except DatasetNotFoundError as err:  # make test prepares it; a bare pytest may not have
        pytest.fail(f"Fashion-MNIST is needed: {err}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path: a Unix socket's path has at most 107 characters."""
    path = Path(tempfile.mkdtemp(prefix="wf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
