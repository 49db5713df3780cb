"""The Grid that keeps the byte ledger: every message and its reply recorded at the size
Flower serializes, by round, phase and member -- the member the roster bound to the node,
also for what it sent before it was bound -- how long each message was in flight,
and nothing for the SuperLink's own error replies. A training round stops waiting for a
member that does not reply once the others have, by the stragglers' rule; other messages
wait their whole timeout."""

from __future__ import annotations

import time

import pytest
from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

from tests.unit.in_process import FIRST_NODE, InProcessGrid
from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.keys import Config, MessageType, Reply
from wash_fed.ledger import Ledger
from wash_fed.strategy.ledger_grid import LedgerGrid
from wash_fed.timing import RoundTime, StragglerWait

pytestmark = pytest.mark.usefixtures("task_identity")

CFG = WashFedConfig.from_mapping(
    {"num-members": 2, "train-subset": 300, "holdout-size": 0, "batch-size": 32}
)


def asked(grid: LedgerGrid, message_type: str, server_round: int) -> list[Message]:
    config: dict[str, wire.ConfigValue] = {
        Config.SERVER_ROUND: server_round,
        Config.REPLY: Reply.METRICS,
    }
    return [
        wire.message(node, message_type, server_round, config, {}, ttl=60.0)
        for node in grid.get_node_ids()
    ]


def test_every_message_and_reply_is_recorded_for_the_member_bound_to_its_node() -> None:
    inner = InProcessGrid(CFG)
    exchanges: list[tuple[int, str, RoundTime | None]] = []
    grid = LedgerGrid(inner, Ledger(), on_exchange=lambda *e: exchanges.append(e))
    hellos = asked(grid, MessageType.HELLO, 0)
    replies = list(grid.send_and_receive(hellos, timeout=10.0))
    assert {e.member for e in grid.ledger.entries} == {-1}, "not bound yet"
    grid.bind(FIRST_NODE, 0)
    grid.bind(FIRST_NODE + 1, 1)
    sizes = {
        (0, "down"): wire.message_bytes(hellos[0]),
        (0, "up"): wire.message_bytes(replies[0]),
        (1, "down"): wire.message_bytes(hellos[1]),
        (1, "up"): wire.message_bytes(replies[1]),
    }
    recorded = {(e.member, e.direction): e.bytes for e in grid.ledger.entries}
    assert recorded == sizes and {e.phase for e in grid.ledger.entries} == {"setup"}

    train = asked(grid, MessageType.TRAIN, 1)
    list(grid.send_and_receive(train, timeout=10.0))
    rows = [e for e in grid.ledger.entries if e.phase == "train"]
    assert sorted((e.member, e.direction, e.round) for e in rows) == [
        (0, "down", 1), (0, "up", 1), (1, "down", 1), (1, "up", 1),
    ]  # fmt: skip
    flights = grid.take_in_flight(1)
    assert set(flights) == {0, 1} and all(s >= 0 for s in flights.values())
    assert grid.take_in_flight(1) == {}, "handed out once"
    assert [(r, phase) for r, phase, _ in exchanges] == [(0, "setup"), (1, "train")]
    setup_time, train_time = (time for _, _, time in exchanges)
    assert train_time is None, "training rounds are split with the strategy's own work"
    assert setup_time is not None and setup_time.compute > 0.0, "the hello's handling"


def test_the_superlinks_own_errors_are_not_a_members_traffic() -> None:
    inner = InProcessGrid(CFG)
    grid = LedgerGrid(inner, Ledger())
    grid.bind(FIRST_NODE, 0)
    grid.bind(FIRST_NODE + 1, 1)
    inner.unreachable = {FIRST_NODE + 1}
    replies = grid.send_and_receive(asked(grid, MessageType.TRAIN, 1), timeout=10.0)
    by_source = {r.metadata.src_node_id: r for r in replies}
    assert by_source.keys() == {FIRST_NODE, SUPERLINK_NODE_ID}
    assert by_source[SUPERLINK_NODE_ID].has_error()
    assert {e.member for e in grid.ledger.entries} == {0}
    assert set(grid.take_in_flight(1)) == {0}


def test_a_message_without_a_reply_is_not_recorded() -> None:
    inner = InProcessGrid(CFG)
    grid = LedgerGrid(inner, Ledger(), poll_interval=0.05)
    inner.absent = {FIRST_NODE}
    replies = list(grid.send_and_receive(asked(grid, MessageType.TRAIN, 1), timeout=0.2))
    assert [r.metadata.src_node_id for r in replies] == [FIRST_NODE + 1]
    assert len(grid.ledger.entries) == 2, "the answered message and its reply only"


def test_a_training_round_waits_for_a_straggler_only_as_long_as_the_rule_says(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = InProcessGrid(CFG.with_values({"num-members": 3}))
    grid = LedgerGrid(inner, Ledger(), poll_interval=0.05, stragglers=StragglerWait(1.0, 0.3))
    for partition in range(3):
        grid.bind(FIRST_NODE + partition, partition)
    inner.absent = {FIRST_NODE + 2}
    started = time.monotonic()
    replies = list(grid.send_and_receive(asked(grid, MessageType.TRAIN, 1), timeout=300.0))
    assert time.monotonic() - started < 150.0, "not the whole round timeout"
    assert sorted(r.metadata.src_node_id for r in replies) == [FIRST_NODE, FIRST_NODE + 1]
    assert "round 1: stopped waiting for member(s) 2 after" in caplog.text

    started = time.monotonic()
    replies = list(grid.send_and_receive(asked(grid, MessageType.HELLO, 0), timeout=1.0))
    assert time.monotonic() - started >= 1.0, "a hello waits its whole timeout"
    assert len(replies) == 2


@pytest.mark.parametrize(
    ("replied", "majority", "deadline"),
    [(2, None, None), (3, 2.0, 2.0 + 10.0), (3, 20.0, 20.0 + 60.0), (4, 20.0, 80.0)],
)
def test_the_stragglers_deadline(
    replied: int, majority: float | None, deadline: float | None
) -> None:
    """Of 4 members, more than half is 3; until then the round has no deadline of its own.
    After: the majority's time plus the larger of min_wait and factor x that time."""
    assert StragglerWait(factor=3.0, min_wait=10.0).deadline(replied, 4, majority) == deadline
    assert StragglerWait(0.0, 10.0).deadline(4, 4, 1.0) is None, "factor 0: off"
