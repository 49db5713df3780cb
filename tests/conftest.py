"""Shared fixtures. Data tests use the real Fashion-MNIST, prepared by `make data`."""

from __future__ import annotations

import pytest

from wash_fed.data import DatasetNotFoundError, ImageData, load_split


@pytest.fixture(scope="session")
def fashion_train() -> ImageData:
    try:
        return load_split("fashion-mnist", train=True)
    except DatasetNotFoundError as err:  # make test prepares it; a bare pytest may not have
        pytest.fail(f"Fashion-MNIST is needed: {err}")
