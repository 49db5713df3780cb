"""The public strategy, started as a ServerApp starts Flower's FedAvg, over three members in
this process (:mod:`tests.unit.in_process`): it checks them, runs the rounds and the final
step, counts every byte and hands over the soup as Flower's Result; a model of another
layout, or an evaluate_fn that gives no accuracy, is refused by name."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from tests.unit.in_process import InProcessGrid
from tests.unit.small_configs import tiny_run
from wash_fed.strategy import Wash
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
