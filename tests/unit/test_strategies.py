"""The population strategy with real Flower messages: deliveries travel to the node the
roster names for each member, failures are kept by partition id, and a reply that lacks
its payload is left out without stopping the run."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.fedavg import FedAvgRounds
from tests.unit.small_configs import three_members
from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.keys import Config, MessageType, Record
from wash_fed.protocol import PapaServer, WashServer, wire_format
from wash_fed.strategy.replies import Replies, gather
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.rounds import PopulationStrategy
from wash_fed.strategy.state import RoundReport

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = {0: 101, 1: 102, 2: 103}  # partition id -> node id
PARAMETERS = {"w": torch.zeros(40), "b": torch.zeros(12)}
NUMELS = [40, 12]


def strategy_for(config: WashFedConfig) -> PopulationStrategy:
    roster = Roster(config, reference={})
    roster.nodes = dict(NODES)
    protocol = (
        WashServer(config, NODES, PARAMETERS)
        if config.strategy == "wash"
        else PapaServer(config, NODES, PARAMETERS)
    )
    return PopulationStrategy(config, roster, protocol)


def answer(msg: Message, **arrays: ArrayRecord) -> Message:
    metrics = MetricRecord({"loss": 1.0, "num-examples": 8})
    return Message(RecordDict({Record.METRICS: metrics, **arrays}), reply_to=msg)


def values_for(partition: int, event: int, config: WashFedConfig) -> ArrayRecord:
    m = config.shuffle_mask(NUMELS, event).num_selected
    values = {"weights": partition * 1000 + torch.arange(m, dtype=torch.float32)}
    return wire.tensors_to_record(wire_format(config).encode(values))


def by_node(messages: list[Message]) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in messages}


def test_deliveries_follow_members_through_a_failure() -> None:
    config = three_members()
    strategy = strategy_for(config)
    round1 = by_node(strategy.messages(MessageType.TRAIN, 1, {}))
    assert set(round1) == set(NODES.values())
    assert all(Record.VALUES not in m.content for m in round1.values())  # nothing due yet
    strategy.aggregate_train(
        1,
        [answer(round1[n], **{Record.VALUES: values_for(p, 1, config)}) for p, n in NODES.items()],
    )
    due = strategy.state.deliveries.due(1)
    assert due is not None and due.event == 1

    round2 = by_node(strategy.messages(MessageType.TRAIN, 2, {}))
    assert wire.config_value(round2[102].content, Config.DELIVERY_EVENT) == 1
    carried = wire.delivery_from_content(round2[102].content)
    assert carried is not None and torch.equal(carried.tensors["weights"], due.tensors["weights"])
    strategy.aggregate_train(
        2,
        [
            answer(round2[101], **{Record.VALUES: values_for(0, 2, config)}),
            Message(Error(code=2, reason="ClientApp raised"), reply_to=round2[102]),
            answer(round2[103], **{Record.VALUES: values_for(2, 2, config)}),
        ],
    )
    report = strategy.state.history[-1]
    assert report.failed == {1: "ClientApp raised"} and report.exchange["participants"] == 2
    assert strategy.state.missing == {1}
    assert strategy.state.deliveries.due(1) is due  # kept for member 1, by partition id
    round3 = by_node(strategy.messages(MessageType.TRAIN, 3, {}))
    assert wire.config_value(round3[102].content, Config.DELIVERY_EVENT) == 1
    assert wire.config_value(round3[101].content, Config.DELIVERY_EVENT) == 2


def test_a_reply_without_its_payload_or_from_a_stranger_is_left_out() -> None:
    config = three_members()
    strategy = strategy_for(config)
    round1 = by_node(strategy.messages(MessageType.TRAIN, 1, {}))
    stranger = Message(
        RecordDict({Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: 1})}),
        dst_node_id=999,
        message_type=MessageType.TRAIN,
    )
    strategy.aggregate_train(
        1,
        [
            answer(round1[101], **{Record.VALUES: values_for(0, 1, config)}),
            answer(round1[102]),  # no values record
            answer(round1[103], **{Record.VALUES: values_for(2, 1, config)}),
            answer(stranger, **{Record.VALUES: values_for(1, 1, config)}),
        ],
    )
    report = strategy.state.history[-1]
    assert set(report.metrics) == {0, 2} and report.failed == {}
    assert "expected ['metrics', 'values']" in report.rejected[1]
    assert report.exchange["participants"] == 2
    assert strategy.state.deliveries.due(1) is None and strategy.state.deliveries.due(0) is not None


def test_replies_are_in_member_order_whatever_order_they_arrived_in() -> None:
    """FedAvg averages the messages in the order it gets them; floating-point sums depend
    on that order, so it must not be the network's."""
    asked = [
        Message(
            RecordDict({Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: 1})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        for node in NODES.values()
    ]
    got = gather(reversed([answer(m) for m in asked]), NODES, None, "round 1")
    assert list(got.accepted) == list(got.messages) == sorted(NODES)
    assert [m.metadata.src_node_id for m in got.messages.values()] == list(NODES.values())


def test_papa_asks_for_weights_on_its_rounds_and_delivers_the_mean_to_all() -> None:
    config = three_members(strategy="papa", papa_every=2)
    strategy = strategy_for(config)
    messages = by_node(strategy.messages(MessageType.TRAIN, 2, {}))
    weights = {
        p: wire_format(config).encode(
            {n: torch.full_like(t, float(p)) for n, t in PARAMETERS.items()}
        )
        for p in NODES
    }
    strategy.aggregate_train(
        2,
        [
            answer(messages[n], **{Record.ARRAYS: wire.tensors_to_record(weights[p])})
            for p, n in NODES.items()
        ],
    )
    for node in NODES.values():
        message = by_node(strategy.messages(MessageType.TRAIN, 3, {}))[node]
        delivery = wire.delivery_from_content(message.content)
        assert delivery is not None and delivery.kind == "mean" and delivery.event == 2
        assert torch.equal(delivery.tensors["w"], torch.ones(40))
    assert strategy.state.history[-1].exchange == {"averaged": 3}


def test_fedavg_reports_each_round_with_its_own_members_metrics() -> None:
    """A round in which every reply failed reports no members; it does not shift the
    figures of the rounds after it."""
    reports: list[RoundReport] = []
    rounds = FedAvgRounds(
        three_members(strategy="fedavg", eval_every=0), lambda _: 0.0, reports.append
    )
    assert rounds.close(0, ArrayRecord()) is None and reports == []  # FedAvg's initial check
    rounds.close(1, ArrayRecord())  # no train metrics: every reply failed
    metrics = {"partition-id": 2, "loss": 0.3, "num-examples": 8}
    rounds.note(Replies(accepted={2: wire.ReplyParts({}, metrics, {})}, failed={1: "gone"}))
    rounds.close(2, ArrayRecord())
    assert [r.round for r in reports] == [1, 2]
    assert reports[0].metrics == {} and reports[1].metrics[2]["loss"] == 0.3
    assert reports[1].failed == {1: "gone"}


def test_a_failure_is_reported_by_its_reason_in_one_line() -> None:
    """Flower's reason for a ClientApp that raised carries the traceback (and, in simulation,
    Ray's wrapping, in colour); a member's failure is its exception's message."""
    strategy = strategy_for(three_members())
    (msg, *_) = strategy.messages(MessageType.TRAIN, 1, {})
    wrapped = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
        '.run()\x1b[39m (pid=1)\n  File "client/task.py", line 167, in train\n'
        "FloatingPointError: member 0: loss became nan\n\nflwr.clientapp.client_app."
        "ClientAppException: \nException ClientAppException occurred. Message: member 0: "
        "loss became nan'>"
    )
    for reason, expected in [
        (wrapped, "member 0: loss became nan"),
        ("ClientApp raised", "ClientApp raised"),
        ("x" * 1000, "x" * 299 + "…"),
        ("", "error code 2"),
    ]:
        reply = Message(Error(code=2, reason=reason), reply_to=msg)
        assert wire.error_reason(reply) == expected
