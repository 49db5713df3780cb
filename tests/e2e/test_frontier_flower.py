"""A tiny frontier sweep end to end on real data, interrupted and continued, with a Flower
spot check that agrees with the population trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.processes import FlowerHarness
from simulations.frontier import main, read_rows


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
    # A row keeps the sweep's base: what ``--set`` changed is part of the point it measured.
    assert first[0].settings["num-members"] == 3 and first[0].settings["batch-size"] == 32
    assert main([*args, "--seeds", "0,1"]) == 0
    rows = read_rows(tmp_path / "runs.jsonl")
    assert rows[:3] == first and len(rows) == 6
    assert {(r.point, r.seed) for r in rows[3:]} == {
        (p, 1) for p in ("fedavg-r1", "wash-p0.05-r10", "ensemble")
    }
    by_point = {r.point: r for r in rows if r.seed == 0}
    # FedAvg's one round moves the model down and up once per member; WASH's ten rounds of
    # values cost less than that; independent members send nothing while they train.
    trained = {point: row.megabytes("train") for point, row in by_point.items()}
    assert trained["ensemble"] == 0
    assert 0 < trained["wash-p0.05-r10"] < trained["fedavg-r1"]
    table = (tmp_path / "frontier.md").read_text()
    assert table.count("\n") == 2 + 3 and "± " in table
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert all(0.0 < r.accuracy <= 1.0 for r in rows)
    assert all(r.threads == 1 for r in rows)  # deterministic=true: one thread
    assert json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])["seed"] == 0

    for key, value in simulation_harness.env.items():  # `flwr run` reaches its SuperLink
        monkeypatch.setenv(key, value)
    assert main([*args, "--seeds", "0", "--points", "wash-p0.05-r10", "--flower"]) == 0
    (flower,) = read_rows(tmp_path / "flower.jsonl")
    population = by_point["wash-p0.05-r10"]
    assert flower.accuracy == population.accuracy
    assert trained["wash-p0.05-r10"] < flower.megabytes("train") < 1.25 * trained["wash-p0.05-r10"]
    spot = (tmp_path / "spot_checks.md").read_text().splitlines()[2]
    assert spot.startswith(f"| wash-p0.05-r10 | 0 | {population.accuracy:.4f}, ")
