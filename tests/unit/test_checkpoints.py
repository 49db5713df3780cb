"""Checkpoints: a member's on disk (written per round, pruned to what the server may resume
from, restored bit for bit, refused when another member's or configuration's) and the
server's (loaded only for a run it can continue)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.checkpoints import MemberCheckpoints
from client.task import MemberTask
from server.checkpoint import ServerCheckpoint
from wash_fed import wire
from wash_fed.config import ConfigError, WashFedConfig
from wash_fed.gate import Quarantine
from wash_fed.keys import NodeConfig
from wash_fed.protocol import Delivery, Exchange
from wash_fed.results import RunResult, write_results
from wash_fed.strategy.state import StrategyState

SMALL = {"train-subset": 1000, "holdout-size": 100, "num-members": 2, "local-steps": 3}


def member(index: int = 0, **overrides: object) -> MemberTask:
    """The built-in member ``index`` of a small run, holding the credential "c"."""
    cfg = WashFedConfig.from_mapping({**SMALL, **overrides})
    node = {NodeConfig.PARTITION_ID: index, NodeConfig.NUM_PARTITIONS: cfg.num_members}
    built = MemberTask(cfg, index, node)
    built.credential = "c"
    return built


def test_checkpoints_are_pruned_to_what_the_server_may_resume_from(tmp_path: Path) -> None:
    cfg, trained = WashFedConfig.from_mapping(SMALL), member()
    store = MemberCheckpoints.of_run(tmp_path / "member-0", 7)
    store.save(trained, cfg, 1, keep_from=0)
    store.save(trained, cfg, 2, keep_from=1)
    # The server stopped saving after round 1:
    store.save(trained, cfg, 3, keep_from=1)
    assert store.rounds() == [1, 2, 3]
    store.save(trained, cfg, 4, keep_from=3)
    assert store.rounds() == [3, 4]
    # No server checkpoint: the newest only.
    store.save(trained, cfg, 5, keep_from=None)
    assert store.rounds() == [5]
    assert store.sibling(8).directory == tmp_path / "member-0" / "run-8"
    store.remove()
    assert not store.directory.exists()


def test_a_member_is_restored_bit_for_bit_from_the_round_asked(tmp_path: Path) -> None:
    cfg, trained = WashFedConfig.from_mapping(SMALL), member()
    store = MemberCheckpoints(tmp_path)
    trained.trained.train_steps(3)
    store.save(trained, cfg, 1, keep_from=0)
    at_round_1 = {k: v.clone() for k, v in trained.member.model.state_dict().items()}
    trained.trained.train_steps(3)
    store.save(trained, cfg, 2, keep_from=1)
    fresh = member()
    fresh.credential = ""
    assert store.restore(fresh, cfg, at_most=1) == 1 and fresh.credential == "c"
    assert all(torch.equal(v, at_round_1[k]) for k, v in fresh.member.model.state_dict().items())
    assert fresh.trained.steps_done == 3
    assert store.restore(fresh, cfg) == 2 and fresh.trained.steps_done == 6
    assert store.restore(fresh, cfg, at_most=0) is None
    # The same steps from the restored state give the same weights.
    again = member()
    store.restore(again, cfg, at_most=1)
    again.trained.train_steps(3)
    mine, theirs = again.member.model.state_dict(), trained.member.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items())


def test_another_members_or_configurations_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = WashFedConfig.from_mapping(SMALL)
    store = MemberCheckpoints(tmp_path)
    store.save(member(0), cfg, 1, keep_from=0)
    with pytest.raises(ValueError, match="is of member 0; this is member 1"):
        store.restore(member(1), cfg)
    other = WashFedConfig.from_mapping({**SMALL, "lr": 0.1})
    with pytest.raises(ValueError, match="trained with other lr"):
        store.restore(member(0, lr=0.1), other)
    # Where things go, timeouts and the device may change on resume.
    moved = WashFedConfig.from_mapping({**SMALL, "output-dir": "elsewhere", "round-timeout": 9})
    assert store.restore(member(0), moved) == 1


def test_only_population_runs_resume() -> None:
    with pytest.raises(ConfigError, match=r"fedavg .* keeps no checkpoint"):
        WashFedConfig.from_mapping({"strategy": "fedavg", "resume-from": "runs/x"})


def server_checkpoint(cfg: WashFedConfig) -> ServerCheckpoint:
    return ServerCheckpoint(
        config=cfg.to_mapping(),
        run_id=7,
        earlier_runs=[5],
        round=2,
        state=StrategyState(Quarantine(3)),
        ledger=[],
        rows=[],
        credentials={0: "c0", 1: "c1"},
    )


def test_the_server_checkpoint_names_what_stands_in_the_way_of_resuming(tmp_path: Path) -> None:
    cfg = WashFedConfig.from_mapping(SMALL)
    with pytest.raises(ConfigError, match=r"no checkpoint\.pt there"):
        ServerCheckpoint.load(tmp_path, cfg)
    server_checkpoint(cfg).save(tmp_path)
    loaded = ServerCheckpoint.load(tmp_path, cfg)
    assert (loaded.round, loaded.chain, loaded.credentials) == (2, [5, 7], {0: "c0", 1: "c1"})
    with pytest.raises(ConfigError, match=r"other seed \(0\); resume it with the same values"):
        ServerCheckpoint.load(tmp_path, WashFedConfig.from_mapping({**SMALL, "seed": 1}))
    write_results(tmp_path / "results.json", RunResult("flower", "wash", cfg, "completed"))
    with pytest.raises(ConfigError, match="completed; nothing to resume"):
        ServerCheckpoint.load(tmp_path, cfg)


@pytest.mark.usefixtures("task_identity")
def test_deliveries_held_as_records_are_checkpointed_after_they_were_sent(
    tmp_path: Path,
) -> None:
    cfg = WashFedConfig.from_mapping(SMALL)
    server_checkpoint(cfg).save(tmp_path)
    without = (tmp_path / "checkpoint.pt").stat().st_size
    checkpoint = server_checkpoint(cfg)
    values = {"weights": torch.randn(10_000).half()}
    shared = Delivery("mean", 2, values)  # as PAPA's mean: one delivery for every member
    deliveries = {0: shared, 1: shared}
    wire.hold_as_records(deliveries)
    checkpoint.state.deliveries.settle([], Exchange(deliveries))
    records, entries = wire.delivery_records(deliveries[1])
    wire.message_bytes(wire.message(7, "train", 3, entries, records))  # sent: Flower's chunks
    checkpoint.save(tmp_path)
    added = (tmp_path / "checkpoint.pt").stat().st_size - without
    assert added < 1.2 * values["weights"].nbytes, "the values are saved once"
    loaded = ServerCheckpoint.load(tmp_path, cfg).state.deliveries
    for member in (0, 1):
        due = loaded.due(member)
        assert due is not None and isinstance(due.tensors, wire.RecordTensors)
        assert torch.equal(due.tensors["weights"], values["weights"])
