"""The final step of a population run, with three members in this process behind a Grid
(:mod:`tests.unit.in_process`): it takes every member's model from the last round's replies
(asking with a collect message only a member that missed that round), sends each the soup
once, recalibrates BatchNorm from their statistics, saves the model the members then
evaluate, and leaves out -- by name -- a member whose model or statistics are not fit to
use."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from tests.unit.in_process import InProcessGrid, Tamper
from tests.unit.small_configs import tiny_run
from wash_fed.data import ImageData
from wash_fed.evaluation import OnData
from wash_fed.keys import MessageType, Metric, Record
from wash_fed.ledger import Ledger
from wash_fed.protocol import server_protocol
from wash_fed.results import FinalResult
from wash_fed.strategy.final import ServerEvaluation, final_step
from wash_fed.strategy.ledger_grid import LedgerGrid
from wash_fed.strategy.report import RunOutput
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.rounds import PopulationStrategy
from wash_fed.training import load_test_data, new_model

pytestmark = pytest.mark.usefixtures("task_identity")

FAULTY = 2


def trained(
    tmp_path: Path, tamper: Tamper | None = None, *, members_test: bool = False
) -> tuple[LedgerGrid, PopulationStrategy]:
    """Three members after two WASH rounds, through the real roster, strategy and ledger
    grid; ``tamper`` changes replies on their way. ``members_test``: the server has no test
    set, so the members test the models they hand over."""
    cfg = tiny_run(**{"output-dir": str(tmp_path)})
    grid = LedgerGrid(InProcessGrid(cfg, tamper), Ledger(), poll_interval=0.01)
    model = new_model(cfg)
    parameters = dict(model.named_parameters())
    roster = Roster(cfg, model.state_dict(), on_bind=grid.bind)
    roster.connect(grid)
    assert roster.parameters == list(parameters)
    protocol = server_protocol(cfg, roster.nodes, parameters)
    strategy = PopulationStrategy(cfg, roster, protocol, members_test=members_test)
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.num_server_rounds, timeout=60.0
    )
    return grid, strategy


def finish(grid: LedgerGrid, strategy: PopulationStrategy) -> tuple[FinalResult, RunOutput]:
    cfg = strategy.cfg
    output = RunOutput.open(cfg, 1, grid.ledger)
    test: ImageData = load_test_data(cfg)
    reference = new_model(cfg).state_dict()
    evaluation = ServerEvaluation(OnData(test, 1000, lambda: new_model(cfg)))
    return final_step(grid, strategy, reference, evaluation, output.keep), output


def shift_bn_statistics(member: int, message_type: str, content: RecordDict) -> None:
    """Member ``FAULTY`` shifts its BatchNorm means and claims a billion batches."""
    if member == FAULTY and message_type == MessageType.BN_STATISTICS:
        stats = content.array_records[Record.STATS]
        content[Record.STATS] = ArrayRecord(
            {k: Array(v.numpy() + (10.0 if k.endswith(".mean") else 0.0)) for k, v in stats.items()}
        )
        content.metric_records[Record.METRICS][Metric.BATCHES] = 10**9


def poison_collection(member: int, message_type: str, content: RecordDict) -> None:
    """Member ``FAULTY`` sends NaN for its model with the last round's reply."""
    if member == FAULTY:
        poison_model(member, message_type, content)


def poison_model(member: int, message_type: str, content: RecordDict) -> None:
    """NaN for the whole model a reply carries (the last round's, or a collect's)."""
    if message_type in (MessageType.TRAIN, MessageType.COLLECT) and Record.ARRAYS in content:
        state = content.array_records[Record.ARRAYS]
        content[Record.ARRAYS] = ArrayRecord(
            {k: Array(poisoned(v.numpy())) for k, v in state.items()}
        )


def miss_the_last_round(member: int, message_type: str, content: RecordDict) -> bool:
    """Member ``FAULTY`` never answers the last round (the one whose reply is its model)."""
    return member == FAULTY and message_type == MessageType.TRAIN and Record.ARRAYS in content


def poisoned(values: np.ndarray) -> np.ndarray:
    """NaN where the values are floating point (a BatchNorm counter stays as it is)."""
    return np.full_like(values, np.nan) if np.issubdtype(values.dtype, np.floating) else values


def test_the_soup_goes_down_once_and_the_members_evaluate_the_saved_model(
    tmp_path: Path,
) -> None:
    grid, strategy = trained(tmp_path)
    final, output = finish(grid, strategy)
    assert final.collected == [0, 1, 2] and final.rejected == {} and final.bn_exchanges == 1
    assert final.final_model == "uniform+bn" and set(final.soups) == {"uniform", "uniform+bn"}
    assert final.evaluated_on == "server" and final.ensemble is not None
    saved = torch.load(output.directory / "final_model.pt")["state_dict"]
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    # The members' test set is the server's: their accuracy of the saved model is its own.
    assert final.members_own_evaluation == dict.fromkeys(("0", "1", "2"), final.final_accuracy)
    model_bytes = sum(4 * t.numel() for t in saved.values() if t.is_floating_point())
    for member in range(3):
        down = {
            phase: sum(
                e.bytes
                for e in grid.ledger.entries
                if (e.member, e.direction, e.phase) == (member, "down", phase)
            )
            for phase in ("bn", "evaluate", "end")
        }
        assert model_bytes < down["bn"] < model_bytes * 1.05, (member, down)
        assert down["evaluate"] == 0, "no message round of its own for the evaluation"
        assert 0 < down["end"] < 0.1 * model_bytes, "the end carries the buffers only"
    assert strategy.roster.told_end == set(strategy.roster.nodes.values())
    phases = {e.phase for e in grid.ledger.entries if e.round == strategy.cfg.final_round}
    assert phases == {"bn", "end"}, "after training: two message rounds, no collection"
    collect = [e for e in grid.ledger.entries if e.phase == "collect"]
    assert {(e.round, e.direction) for e in collect} == {(strategy.cfg.num_server_rounds, "up")}
    assert len(collect) == 3 and all(model_bytes < e.bytes < model_bytes * 1.05 for e in collect)


def test_a_member_that_missed_the_last_round_is_asked_for_its_model(tmp_path: Path) -> None:
    grid, strategy = trained(tmp_path, miss_the_last_round)
    final, _ = finish(grid, strategy)
    assert final.collected == [0, 1, 2] and final.rejected == {}
    asked = [e for e in grid.ledger.entries if e.round == strategy.cfg.final_round]
    collect = {(e.member, e.direction) for e in asked if e.phase == "collect"}
    assert collect == {(FAULTY, "up"), (FAULTY, "down")}, "only the member that missed it"


def test_shifted_batchnorm_statistics_are_left_out_of_the_merge(tmp_path: Path) -> None:
    grid, strategy = trained(tmp_path, shift_bn_statistics)
    final, _ = finish(grid, strategy)
    assert final.collected == [0, 1, 2], "its model is still in the soup"
    assert final.rejected[str(FAULTY)].startswith("BatchNorm statistics: ")
    assert set(final.rejected) == {str(FAULTY)} and math.isfinite(final.final_accuracy)


def test_a_poisoned_collection_is_left_out_of_the_soup(tmp_path: Path) -> None:
    grid, strategy = trained(tmp_path, poison_collection)
    final, _ = finish(grid, strategy)
    assert final.collected == [0, 1]
    assert final.rejected[str(FAULTY)].startswith("collect: ")
    assert "non-finite" in final.rejected[str(FAULTY)]


def test_with_no_member_collected_the_final_step_fails_and_saves_nothing(tmp_path: Path) -> None:
    grid, strategy = trained(tmp_path, poison_model)
    cfg = strategy.cfg
    output = RunOutput.open(cfg, 1, grid.ledger)
    with pytest.raises(RuntimeError, match="no member could be collected"):
        final_step(grid, strategy, new_model(cfg).state_dict(), ServerEvaluation(), output.keep)
    assert not (output.directory / "final_model.pt").exists()


def test_without_a_test_set_of_its_own_the_server_weighs_the_members_figures(
    tmp_path: Path,
) -> None:
    """Each member's test set is the run's here, so their weighed accuracy of the saved model
    is the model's own, and every member's last-round reply reported it."""
    grid, strategy = trained(tmp_path, members_test=True)
    output = RunOutput.open(strategy.cfg, 1, grid.ledger)
    reference = new_model(strategy.cfg).state_dict()
    final = final_step(grid, strategy, reference, ServerEvaluation(), output.keep)
    assert final.evaluated_on == "members" and final.ensemble is None
    assert len(final.members) == 3
    own = set(final.members_own_evaluation.values())
    assert own == {final.final_accuracy}
