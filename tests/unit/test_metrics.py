"""Prometheus metrics on the registry: the byte counter follows the ledger exactly, and a
round's figures become gauges, counters and a histogram."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from wash_fed.ledger import Ledger
from wash_fed.strategy.metrics import RunMetrics
from wash_fed.strategy.state import RoundReport
from wash_fed.timing import RoundTime


def sample(registry_text: str, name: str, **labels: str) -> float:
    """The value of one sample in the text exposition format."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in registry_text.splitlines():
        if line.startswith(f"{name}{{"):
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1 : -1].split(",")))
            if got == wanted:
                return float(value)
    raise KeyError(f"{name}{{{wanted}}} not exported")


def test_byte_counter_follows_the_ledger_exactly() -> None:
    ledger = Ledger()
    metrics = RunMetrics("wash")
    ledger.record(1, 0, "up", "train", 100)
    ledger.record(1, 0, "down", "train", 50)
    metrics.sync_ledger(ledger)
    ledger.record(2, 1, "up", "train", 7)
    ledger.record(3, 1, "up", "collect", 1000)
    metrics.sync_ledger(ledger)
    metrics.sync_ledger(ledger)  # nothing new: nothing counted twice
    text = generate_latest(metrics.registry).decode()
    assert (
        sample(text, "wash_fed_bytes_total", strategy="wash", direction="up", phase="train") == 107
    )
    assert (
        sample(text, "wash_fed_bytes_total", strategy="wash", direction="down", phase="train") == 50
    )
    assert (
        sample(text, "wash_fed_bytes_total", strategy="wash", direction="up", phase="collect")
        == 1000
    )


def test_round_figures_become_gauges_and_a_histogram() -> None:
    metrics = RunMetrics("papa")
    report = RoundReport(
        1,
        {0: {"loss": 0.5, "test-accuracy": 0.8}, 1: {"loss": 0.7, "test-accuracy": 0.6}},
        {},
        2.5,
        {},
    )
    metrics.observe_round(report, 1000, RoundTime(1.5, 0.25, 0.25, 0.25, 0.25))
    metrics.observe_final({"soup": 0.75})
    text = generate_latest(metrics.registry).decode()
    assert sample(text, "wash_fed_rounds_total", strategy="papa") == 1
    assert sample(text, "wash_fed_member_loss", strategy="papa", member="1") == 0.7
    assert sample(text, "wash_fed_accuracy", strategy="papa", model="member_mean") == pytest.approx(
        0.7
    )
    assert sample(text, "wash_fed_accuracy", strategy="papa", model="soup") == 0.75
    assert sample(text, "wash_fed_round_duration_seconds_bucket", strategy="papa", le="5.0") == 1
    assert sample(text, "wash_fed_fedavg_equivalent_bytes_total", strategy="papa") == 1000
    parts = {"compute": 1.5, "slot": 0.25, "delivery": 0.25, "transfer": 0.25, "server": 0.25}
    for part, seconds in parts.items():
        assert sample(text, "wash_fed_round_part_seconds_total", strategy="papa", part=part) == (
            seconds
        )
