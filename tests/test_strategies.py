"""The population strategies' bookkeeping with real Flower messages: who takes part in a
shuffle event, and that a member that fails loses nothing and takes nobody's values."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.strategies import PapaStrategy, WashStrategy
from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.training import wash_mask

NODES = {101: 0, 102: 1, 103: 2}
NUMELS = [40, 12]


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Flower builds messages only inside a running app; give this process an identity."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def cfg(**overrides: object) -> WashFedConfig:
    return WashFedConfig(num_members=3, shuffle_prob=0.5, layer_schedule="constant", **overrides)  # type: ignore[arg-type]


def answer(msg: Message, partition: int, **arrays: ArrayRecord) -> Message:
    metrics = MetricRecord({"partition-id": partition, "loss": 1.0, "num-examples": 8})
    return Message(RecordDict({wire.METRICS: metrics, **arrays}), reply_to=msg)


def values_for(partition: int, event: int, config: WashFedConfig) -> ArrayRecord:
    """A member's gathered values: every value names its owner (partition * 1000 + index)."""
    m = wash_mask(config, NUMELS, event).num_selected
    return wire.tensors_to_record(
        {"weights": partition * 1000 + torch.arange(m, dtype=torch.float32)}
    )


def by_node(messages: list[Message]) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in messages}


def test_a_member_that_fails_keeps_its_delivery_and_skips_the_next_event() -> None:
    config = cfg()
    strategy = WashStrategy(config, NODES, NUMELS)
    round1 = by_node(list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None)))  # type: ignore[arg-type]
    assert all(wire.VALUES not in m.content for m in round1.values())  # nothing due yet
    assert all(wire.config_value(m.content, "reply") == wire.REPLY_VALUES for m in round1.values())
    strategy.aggregate_train(
        1,
        [answer(round1[n], p, **{wire.VALUES: values_for(p, 1, config)}) for n, p in NODES.items()],
    )
    sent = torch.stack(
        [wire.record_to_tensors(values_for(p, 1, config))["weights"] for p in range(3)]
    )
    received = torch.stack(
        [
            wire.record_to_tensors(strategy.deliveries[n].records[wire.VALUES])["weights"]
            for n in NODES
        ]
    )
    assert torch.equal(sent.sort(0).values, received.sort(0).values)  # event 1 is a permutation
    first_delivery = received[1].clone()

    # Round 2: member 1 (node 102) fails after being sent its event-1 values.
    round2 = by_node(list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), None)))  # type: ignore[arg-type]
    assert wire.config_value(round2[102].content, "values-event") == 1
    replies = [
        answer(round2[101], 0, **{wire.VALUES: values_for(0, 2, config)}),
        Message(Error(code=0, reason="ClientApp crashed"), reply_to=round2[102]),
        answer(round2[103], 2, **{wire.VALUES: values_for(2, 2, config)}),
    ]
    strategy.aggregate_train(2, replies)
    report = strategy.history[-1]
    assert report.exchange["participants"] == 2 and report.failed == {102: "ClientApp crashed"}
    # Its event-1 values are still due, untouched; the event-2 exchange did not include it.
    kept = strategy.deliveries[102]
    assert kept.config == {"values-event": 1}
    assert torch.equal(wire.record_to_tensors(kept.records[wire.VALUES])["weights"], first_delivery)
    event2 = [
        wire.record_to_tensors(strategy.deliveries[n].records[wire.VALUES])["weights"]
        for n in (101, 103)
    ]
    owners = {int(v) // 1000 for v in torch.cat(event2)}
    assert owners <= {0, 2}  # member 1's old values never leak into event 2

    # Round 3: the message to node 102 carries the event-1 values again.
    round3 = by_node(list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), None)))  # type: ignore[arg-type]
    resent = wire.record_to_tensors(round3[102].content.array_records[wire.VALUES])["weights"]
    assert torch.equal(resent, first_delivery)
    assert wire.config_value(round3[102].content, "values-event") == 1
    assert wire.config_value(round3[101].content, "values-event") == 2


def test_a_member_with_bad_values_is_left_out_and_the_rest_shuffle() -> None:
    config = cfg()
    strategy = WashStrategy(config, NODES, NUMELS)
    messages = by_node(list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None)))  # type: ignore[arg-type]
    m = wash_mask(config, NUMELS, 1).num_selected
    bad = torch.zeros(m)
    bad[0] = math.nan
    replies = [
        answer(messages[101], 0, **{wire.VALUES: values_for(0, 1, config)}),
        answer(messages[102], 1, **{wire.VALUES: wire.tensors_to_record({"weights": bad})}),
        answer(
            messages[103],
            2,
            **{wire.VALUES: wire.tensors_to_record({"weights": torch.ones(m + 1)})},
        ),
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.history[-1].exchange["participants"] == 1
    assert strategy.deliveries == {}  # fewer than two participants: nothing to exchange


def test_papa_delivers_the_mean_on_its_rounds_only() -> None:
    config = cfg(strategy="papa", papa_every=2)
    strategy = PapaStrategy(config, NODES)
    assert (
        strategy.reply_for(1) == wire.REPLY_METRICS and strategy.reply_for(2) == wire.REPLY_WEIGHTS
    )
    messages = by_node(list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), None)))  # type: ignore[arg-type]
    weights = {p: {"w": torch.full((3,), float(p))} for p in NODES.values()}
    strategy.aggregate_train(
        2,
        [
            answer(messages[n], p, **{wire.ARRAYS: wire.tensors_to_record(weights[p])})
            for n, p in NODES.items()
        ],
    )
    for node in NODES:
        mean = wire.record_to_tensors(strategy.deliveries[node].records[wire.MEAN])["w"]
        assert torch.equal(mean, torch.full((3,), 1.0))
    aggregated = strategy.history[-1]
    assert aggregated.exchange == {"averaged": 3}
