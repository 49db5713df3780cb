"""The frontier sweep: its summary and Pareto front, and a tiny sweep end to end on real
data, interrupted and continued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.frontier import Summary, main, pareto_front, read_rows, summarise


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
    rows: list[dict[str, Any]] = [
        {"point": "a", "strategy": "wash", "seed": s, "accuracy": acc, "bytes": 2e6}
        for s, acc in enumerate((0.80, 0.82, 0.84))
    ]
    (only,) = summarise(rows)
    assert only.seeds == 3 and only.megabytes == 2.0
    assert only.accuracy == pytest.approx(0.82) and only.spread == pytest.approx(0.02)


@pytest.mark.slow
def test_a_tiny_sweep_runs_and_continues_where_it_stopped(tmp_path: Path) -> None:
    args = [
        "--points",
        "fedavg-r1,wash-p0.05-r10,ensemble",
        "--total-steps",
        "20",
        "--set",
        "train-subset=600 holdout-size=0 test-subset=300 num-members=3 batch-size=32",
        "--out",
        str(tmp_path),
    ]
    assert main([*args, "--seeds", "0,1"]) == 0
    first = read_rows(tmp_path / "runs.jsonl")
    assert len(first) == 6
    # Run again with a third seed: only the three missing runs train.
    assert main([*args, "--seeds", "0,1,2"]) == 0
    rows = read_rows(tmp_path / "runs.jsonl")
    assert rows[:6] == first and len(rows) == 9
    assert {(r["point"], r["seed"]) for r in rows[6:]} == {
        (p, 2) for p in ("fedavg-r1", "wash-p0.05-r10", "ensemble")
    }
    by_point = {r["point"]: r for r in rows if r["seed"] == 0}
    # FedAvg's one round moves the model down and up once per member; WASH's ten rounds of
    # values cost less than that; independent members send nothing while they train.
    assert by_point["ensemble"]["bytes_train"] == 0
    assert 0 < by_point["wash-p0.05-r10"]["bytes_train"] < by_point["fedavg-r1"]["bytes_train"]
    table = (tmp_path / "frontier.md").read_text()
    assert table.count("\n") == 2 + 3 and "± " in table
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert all(0.0 < r["accuracy"] <= 1.0 for r in rows)
    assert json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])["seed"] == 0


def test_unknown_points_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--points", "fedavg-r2", "--out", str(tmp_path)]) == 2
    assert "fedavg-r2" in capsys.readouterr().err
