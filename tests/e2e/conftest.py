"""Fixtures of the end-to-end lane: real Flower processes on this machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.processes import FlowerHarness


@pytest.fixture(scope="module")
def simulation_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerHarness]:
    """A simulation SuperLink of the test module's own; every process it started is gone
    after the module (the harness's close raises where one survives)."""
    with FlowerHarness(tmp_path_factory.mktemp("flwr-home")) as harness:
        harness.start_superlink(simulation=True)
        yield harness
