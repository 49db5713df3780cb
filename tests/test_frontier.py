"""The frontier sweep: its summary and Pareto front, and a tiny sweep end to end on real
data, interrupted and continued, with a Flower spot check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.frontier import Summary, main, pareto_front, read_rows, summarise
from simulations.local_flower import FlowerHarness


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
def test_a_tiny_sweep_continues_where_it_stopped_and_flower_agrees(
    tmp_path: Path, simulation_harness: FlowerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two seeds, then a third: only the missing runs train. Then one point through a real
    `flwr run` simulation: deterministic, it ends with the population's accuracy, and its
    training bytes are the population's plus Flower's framing."""
    args = [
        "--points",
        "fedavg-r1,wash-p0.05-r10,ensemble",
        "--total-steps",
        "20",
        "--set",
        "train-subset=600 holdout-size=0 test-subset=300 num-members=3 batch-size=32 "
        "deterministic=true",
        "--out",
        str(tmp_path),
    ]
    assert main([*args, "--seeds", "0"]) == 0
    first = read_rows(tmp_path / "runs.jsonl")
    assert len(first) == 3
    assert main([*args, "--seeds", "0,1"]) == 0
    rows = read_rows(tmp_path / "runs.jsonl")
    assert rows[:3] == first and len(rows) == 6
    assert {(r["point"], r["seed"]) for r in rows[3:]} == {
        (p, 1) for p in ("fedavg-r1", "wash-p0.05-r10", "ensemble")
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
    assert all(r["threads"] == 1 for r in rows)  # deterministic=true: one thread
    assert json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])["seed"] == 0

    for key, value in simulation_harness.env.items():  # `flwr run` reaches its SuperLink
        monkeypatch.setenv(key, value)
    assert main([*args, "--seeds", "0", "--points", "wash-p0.05-r10", "--flower"]) == 0
    (flower,) = read_rows(tmp_path / "flower.jsonl")
    population = by_point["wash-p0.05-r10"]
    assert flower["accuracy"] == population["accuracy"]
    assert population["bytes_train"] < flower["bytes_train"] < 1.25 * population["bytes_train"]
    spot = (tmp_path / "spot_checks.md").read_text().splitlines()[2]
    assert spot.startswith(f"| wash-p0.05-r10 | 0 | {population['accuracy']:.4f}, ")


def test_unknown_points_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--points", "fedavg-r2", "--out", str(tmp_path)]) == 2
    assert "fedavg-r2" in capsys.readouterr().err
