"""The frontier sweep's summary, its Pareto front, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.frontier import Summary, SweepRow, main, pareto_front, summarise
from wash_fed.results import FinalResult


def summary(point: str, accuracy: float, megabytes: float) -> Summary:
    return Summary(point, point.split("-")[0], 3, accuracy, 0.01, megabytes, None, None)


def test_the_front_keeps_only_points_nothing_beats() -> None:
    points = [
        summary("cheap", 0.80, 1.0),
        summary("dominated", 0.79, 5.0),  # more bytes, less accuracy than "cheap"
        summary("better", 0.85, 10.0),
        summary("tie-in-bytes", 0.84, 10.0),  # as many bytes as "better", less accuracy
        summary("best", 0.86, 100.0),
    ]
    assert [s.point for s in pareto_front(points)] == ["cheap", "better", "best"]


def test_a_summary_is_the_mean_and_spread_over_seeds() -> None:
    rows = [
        SweepRow(
            "a",
            s,
            "wash",
            {},
            FinalResult(acc, "uniform+bn"),
            [],
            {"up": 1_500_000, "down": 500_000},
            1.0,
        )
        for s, acc in enumerate((0.80, 0.82, 0.84))
    ]
    (only,) = summarise(rows)
    assert only.seeds == 3 and only.megabytes == 2.0
    assert only.accuracy == pytest.approx(0.82) and only.spread == pytest.approx(0.02)


def test_unknown_points_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--points", "fedavg-r2", "--out", str(tmp_path)]) == 2
    assert "fedavg-r2" in capsys.readouterr().err
