"""The public strategy, started as a ServerApp starts Flower's FedAvg, over three members in
this process (:mod:`tests.unit.in_process`): it checks them, runs the rounds and the final
step, counts every byte and hands over the soup as Flower's Result; a model of another
layout, or an evaluate_fn that gives no accuracy, is refused by name. Given a RunRecord, it
writes the run's folder and feeds its metrics; a failed run says so there."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from tests.unit.in_process import FIRST_NODE, InProcessGrid
from tests.unit.small_configs import tiny_run
from wash_fed.ledger import Ledger
from wash_fed.results import read_results
from wash_fed.strategy import RunRecord, Wash
from wash_fed.training import new_model

pytestmark = pytest.mark.usefixtures("task_identity")


def test_wash_starts_like_fedavg_and_hands_over_the_soup() -> None:
    cfg = tiny_run(**{"test-on-server": False})
    strategy = Wash(cfg)
    scored: list[int] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        scored.append(server_round)
        return MetricRecord({"accuracy": float(len(scored))})

    result = strategy.start(
        InProcessGrid(cfg), ArrayRecord(new_model(cfg).state_dict()), evaluate_fn=evaluate
    )
    assert strategy.final_model is not None and strategy.final is not None
    handed = result.arrays.to_torch_state_dict()
    assert all(torch.equal(handed[k], v) for k, v in strategy.final_model.items())
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert set(scored) == {cfg.final_round}, "the final step scores with evaluate_fn"
    figures = result.evaluate_metrics_serverapp[cfg.final_round]
    assert figures["final-accuracy"] == strategy.final.final_accuracy
    assert strategy.ledger.total("up") > 0 and strategy.ledger.total("down") > 0


def test_members_of_another_model_are_refused_before_any_training() -> None:
    cfg = tiny_run(**{"test-on-server": False})
    other = {"weight": torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match="builds another model than the server"):
        Wash(cfg).start(InProcessGrid(cfg), ArrayRecord(other))


def test_an_evaluate_fn_without_accuracy_is_named() -> None:
    cfg = tiny_run(**{"test-on-server": False})
    with pytest.raises(ValueError, match=r"evaluate_fn returned .* a number 'accuracy'"):
        Wash(cfg).start(
            InProcessGrid(cfg),
            ArrayRecord(new_model(cfg).state_dict()),
            evaluate_fn=lambda r, a: MetricRecord({"loss": 1.0}),
        )


def test_a_record_gets_every_round_the_final_figures_and_every_byte(tmp_path: Path) -> None:
    cfg = tiny_run(**{"test-on-server": False, "output-dir": str(tmp_path)})
    with RunRecord.open(cfg, run_id=5) as record:
        strategy = Wash(cfg, record=record)
        strategy.start(
            InProcessGrid(cfg),
            ArrayRecord(new_model(cfg).state_dict()),
            evaluate_fn=lambda r, a: MetricRecord({"accuracy": 0.5}),
        )
    (folder,) = tmp_path.glob("*-5")
    results = read_results(folder)
    assert results.status == "completed" and [row.round for row in results.rounds] == [1, 2]
    assert results.final is not None and results.final.final_accuracy == 0.5
    assert sorted(results.members) == ["0", "1", "2"]
    assert Ledger.read_csv(folder / "ledger.csv").entries == strategy.ledger.entries
    for direction in ("up", "down"):
        exported = record.metrics.registry.get_sample_value(
            "wash_fed_bytes_total",
            {"strategy": cfg.label, "direction": direction, "phase": "train"},
        )
        assert exported == strategy.ledger.total(direction, "train") > 0
    rounds = record.metrics.registry.get_sample_value(
        "wash_fed_rounds_total", {"strategy": cfg.label}
    )
    assert rounds == 2


def test_a_failed_run_says_so_in_its_record(tmp_path: Path) -> None:
    cfg = tiny_run(**{"test-on-server": False, "output-dir": str(tmp_path)})
    with pytest.raises(RuntimeError), RunRecord.open(cfg, run_id=6) as record:
        Wash(cfg, record=record).start(InProcessGrid(cfg), ArrayRecord({"w": torch.zeros(2)}))
    results = read_results(next(tmp_path.glob("*-6")))
    assert results.status == "failed"
    assert results.error is not None and "another model" in results.error


def test_a_node_that_cannot_be_reached_does_not_fail_the_preflight_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its member is waited for until node-wait-timeout; with min-members checked, the run
    starts without it and completes with the others."""
    cfg = tiny_run(**{"test-on-server": False, "min-members": 2, "node-wait-timeout": 1.0})
    grid = InProcessGrid(cfg)
    grid.unreachable = {FIRST_NODE + 2}
    strategy = Wash(cfg)
    strategy.start(
        grid,
        ArrayRecord(new_model(cfg).state_dict()),
        evaluate_fn=lambda r, a: MetricRecord({"accuracy": 0.5}),
    )
    assert strategy.roster is not None and sorted(strategy.roster.nodes) == [0, 1]
    assert strategy.final is not None and strategy.final.collected == [0, 1]
    assert f"node {FIRST_NODE + 2} could not be checked" in caplog.text
    assert "starting without members [2], taken in when they come (min-members=2)" in caplog.text


def test_without_enough_members_the_wait_ends_naming_those_missing() -> None:
    cfg = tiny_run(**{"test-on-server": False, "node-wait-timeout": 1.0})
    grid = InProcessGrid(cfg)
    grid.unreachable = {FIRST_NODE + 1}
    with pytest.raises(TimeoutError, match=r"min-members=3; members \[1\] never answered"):
        Wash(cfg).start(grid, ArrayRecord(new_model(cfg).state_dict()))


def test_a_busy_metrics_port_fails_the_record_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tiny_run(**{"output-dir": str(tmp_path), "metrics-port": port})
        with pytest.raises(OSError, match="Address already in use"):
            RunRecord.open(cfg, run_id=7)
    results = read_results(next(tmp_path.glob("*-7")))
    assert results.status == "failed" and "Address already in use" in str(results.error)
