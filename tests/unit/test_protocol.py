"""The member protocol on plain tensors: who takes part in an exchange, what a member that
fails keeps, and that a member applies each delivery once."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.small_configs import three_members
from wash_fed.config import WashFedConfig
from wash_fed.gate import ReplyGate
from wash_fed.keys import SCALES_SUFFIX
from wash_fed.population import GatedServer
from wash_fed.protocol import (
    Deliveries,
    Delivery,
    Exchange,
    FedAvgServer,
    PapaServer,
    ServerProtocol,
    WashServer,
    apply_delivery,
    member_payload,
    round_reply,
    server_protocol,
    wire_format,
)
from wash_fed.training import Member, TrainingData, load_training_data

MEMBERS = [0, 1, 2]
PARAMETERS = {"w": torch.zeros(40), "b": torch.zeros(12)}
NUMELS = [40, 12]


def owned_values(member: int, event: int, config: WashFedConfig) -> dict[str, torch.Tensor]:
    """A member's payload in which every value names its owner (member * 1000 + index)."""
    m = config.shuffle_mask(NUMELS, event).num_selected
    return {"weights": member * 1000 + torch.arange(m, dtype=torch.float32)}


def test_wash_delivers_a_permutation_of_what_the_participants_sent() -> None:
    config = three_members()
    server = WashServer(config, MEMBERS, PARAMETERS)
    assert server.reply_for(1) == "values"
    exchange = server.exchange(1, {p: owned_values(p, 1, config) for p in MEMBERS})
    sent = torch.stack([owned_values(p, 1, config)["weights"] for p in MEMBERS])
    received = torch.stack([exchange.deliveries[p].tensors["weights"] for p in MEMBERS])
    assert torch.equal(sent.sort(0).values, received.sort(0).values)  # per coordinate
    assert exchange.counts["moved"] > 0 and exchange.counts["participants"] == 3
    assert all(d.kind == "values" and d.event == 1 for d in exchange.deliveries.values())
    again = WashServer(config, MEMBERS, PARAMETERS).exchange(
        1, {p: owned_values(p, 1, config) for p in MEMBERS}
    )
    assert again.digest == exchange.digest  # deterministic in (seed, event)


@pytest.mark.parametrize("answered", [MEMBERS, MEMBERS[:2]], ids=["all", "one left out"])
def test_permutations_drawn_as_messages_go_out_change_nothing(answered: list[int]) -> None:
    config = three_members()
    payloads = {p: owned_values(p, 1, config) for p in answered}
    plain = WashServer(config, MEMBERS, PARAMETERS).exchange(1, dict(payloads))
    server = WashServer(config, MEMBERS, PARAMETERS)
    server.prepare(1, len(MEMBERS))  # for all three, as the round's messages go out
    server.wait_prepared()
    prepared = server.exchange(1, dict(payloads))
    assert prepared.digest == plain.digest and prepared.counts == plain.counts


@pytest.mark.parametrize("wire_dtype", ["int8", "int4"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(1e-3, 1e3))
def test_a_quantized_shuffle_keeps_each_coordinates_decoded_values(
    wire_dtype: str, seed: int, spread: float
) -> None:
    """The server reads (decodes) what members send, shuffles the decoded values -- each
    coordinate keeps its multiset -- and quantizes each member's new values on the way
    down: decoded, they are that multiset again within half the largest block scale."""
    config = three_members(**{"wire-dtype": wire_dtype})
    server, wire = WashServer(config, MEMBERS, PARAMETERS), wire_format(config)
    m = config.shuffle_mask(NUMELS, 1).num_selected
    generator = torch.Generator().manual_seed(seed)
    sent = {
        p: wire.encode({"weights": torch.randn(m, generator=generator) * spread}) for p in MEMBERS
    }
    read = {p: server.read(1, payload) for p, payload in sent.items()}
    before = torch.stack([read[p]["weights"] for p in MEMBERS]).sort(0).values
    exchange = server.exchange(1, read)
    like = {"weights": torch.empty(m)}
    after = (
        torch.stack([wire.decode(exchange.deliveries[p].tensors, like)["weights"] for p in MEMBERS])
        .sort(0)
        .values
    )
    scale = max(
        float(d.tensors[f"weights{SCALES_SUFFIX}"].max()) for d in exchange.deliveries.values()
    )
    assert (after - before).abs().max() <= scale / 2 * (1 + 1e-5)
    assert exchange.counts["moved"] > 0


@pytest.mark.parametrize("strategy", ["wash", "papa", "ensemble"])
def test_the_last_round_replies_with_the_whole_model(strategy: str) -> None:
    """A population strategy's last round sends the members' models up for the final step
    (no exchange follows it); FedAvg's replies stay its state, whose mean is its model."""
    config = three_members(**{"strategy": strategy, "num-server-rounds": 4, "papa-every": 1})
    protocol = server_protocol(config, MEMBERS, PARAMETERS)
    replies = [round_reply(protocol, r) for r in range(1, 5)]
    assert replies[:3] == [protocol.reply_for(r) for r in range(1, 4)]
    assert replies[3] == "final" != protocol.reply_for(4)
    fedavg = FedAvgServer(config, MEMBERS, PARAMETERS)
    assert round_reply(fedavg, 4) == "state"


def test_a_member_that_fails_keeps_its_delivery_and_takes_nobodys_values() -> None:
    config = three_members()
    server = WashServer(config, MEMBERS, PARAMETERS)
    deliveries = Deliveries()
    first = server.exchange(1, {p: owned_values(p, 1, config) for p in MEMBERS})
    deliveries.settle(MEMBERS, first)
    kept = deliveries.due(1)
    assert kept is not None

    # Round 2: member 1 fails after being sent its event-1 values.
    second = server.exchange(2, {p: owned_values(p, 2, config) for p in (0, 2)})
    deliveries.settle([0, 2], second)
    assert second.counts["participants"] == 2 and set(second.deliveries) == {0, 2}
    assert deliveries.due(1) is kept  # still due, untouched
    owners = {int(v) // 1000 for p in (0, 2) for v in second.deliveries[p].tensors["weights"]}
    assert owners <= {0, 2}  # member 1's values never leak into event 2
    assert deliveries.due(0).event == 2  # type: ignore[union-attr]


def gated_exchange(
    server: ServerProtocol, server_round: int, payloads: Mapping[int, Mapping[str, torch.Tensor]]
) -> tuple[Exchange, dict[int, str]]:
    """The exchange of what the reply gate admits of ``payloads``, as every runner makes it,
    and why the gate left the others out."""
    gated = GatedServer(server, ReplyGate(server.cfg.gate.outlier_factor, lambda _: None))
    admission = gated.admit(server_round, payloads)
    return server.exchange(server_round, admission.accepted), admission.rejected


def test_bad_payloads_are_left_out_with_a_reason_and_the_rest_shuffle() -> None:
    config = three_members()
    server = WashServer(config, MEMBERS, PARAMETERS)
    m = config.shuffle_mask(NUMELS, 1).num_selected
    nan = torch.zeros(m)
    nan[0] = math.nan
    exchange, rejected = gated_exchange(
        server,
        1,
        {
            0: owned_values(0, 1, config),
            1: {"weights": nan},
            2: {"weights": torch.ones(m + 1)},
        },
    )
    assert set(rejected) == {1, 2}
    assert "non-finite" in rejected[1] and "shape" in rejected[2]
    assert exchange.deliveries == {}  # one participant: nothing to exchange
    _, wrong_kind = gated_exchange(server, 1, {0: owned_values(0, 1, config), 1: {"momentum": nan}})
    assert "missing ['weights'], unexpected ['momentum']" in wrong_kind[1]


def weights(value: float) -> dict[str, torch.Tensor]:
    """Parameters shaped like PARAMETERS, every entry ``value``."""
    return {name: torch.full_like(t, value) for name, t in PARAMETERS.items()}


def test_papa_delivers_the_mean_on_its_rounds_and_a_newer_mean_replaces_an_older() -> None:
    config = three_members(strategy="papa", papa_every=2)
    server = PapaServer(config, MEMBERS, PARAMETERS)
    assert server.reply_for(1) == "metrics" and server.reply_for(2) == "weights"
    assert server.exchange(1, {p: weights(0.0) for p in MEMBERS}).deliveries == {}
    deliveries = Deliveries()
    exchange = server.exchange(2, {p: weights(float(p)) for p in MEMBERS})
    deliveries.settle(MEMBERS, exchange)
    assert all(torch.equal(exchange.deliveries[p].tensors["w"], torch.ones(40)) for p in MEMBERS)
    assert exchange.counts == {"averaged": 3}
    # Member 2 fails round 4; the mean of round 2 is replaced by round 4's for everyone.
    later = server.exchange(4, {p: weights(2.0 * p) for p in (0, 1)})
    deliveries.settle([0, 1], later)
    assert deliveries.due(2).event == 4  # type: ignore[union-attr]
    assert torch.equal(deliveries.due(2).tensors["b"], torch.ones(12))  # type: ignore[union-attr]


def test_papa_leaves_out_what_the_gate_rejects() -> None:
    server = PapaServer(three_members(strategy="papa"), range(5), PARAMETERS)
    payloads = {p: weights(1.0 + 0.01 * p) for p in range(5)}
    payloads[1] = {**weights(1.0), "w": torch.full((40,), math.nan)}
    payloads[2] = weights(1000.0)  # judged against members 0 and 4, the other well-formed ones
    payloads[3] = {"w": torch.ones(40, dtype=torch.float64), "b": torch.ones(12)}
    exchange, rejected = gated_exchange(server, 1, payloads)
    assert set(rejected) == {1, 2, 3} and exchange.counts == {"averaged": 2}
    assert "non-finite" in rejected[1] and "float64" in rejected[3]
    mean = exchange.deliveries[2].tensors["w"]  # every member is pulled toward 0 and 4's mean
    assert torch.allclose(mean, torch.full((40,), 1.02))


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return load_training_data(
        WashFedConfig.from_mapping(
            {"train-subset": 600, "holdout-size": 0, "num-members": 2, "batch-size": 32}
        )
    )


def test_a_member_applies_each_delivery_once(data: TrainingData) -> None:
    config = WashFedConfig.from_mapping(
        {
            "train-subset": 600,
            "holdout-size": 0,
            "num-members": 2,
            "batch-size": 32,
            "shuffle-prob": 0.3,
            "wire-dtype": "float16",  # values a cast format carries as they are: "+ 1.0"
        }
    )
    a, b = (Member(config, i, data.member(i), torch.device("cpu")) for i in range(2))
    a.train_steps(2)
    sent = member_payload(a, "values", 1)
    mask = a.shuffle_mask(1)
    before = [p.detach().clone() for p in b.parameters()]
    delivery = Delivery("values", 1, {"weights": sent["weights"] + 1.0})
    assert apply_delivery(b, delivery) and b.applied_event == 1
    assert torch.equal(member_payload(b, "values", 1)["weights"], sent["weights"] + 1.0)
    for old, new, selected in zip(before, b.parameters(), mask.indices, strict=True):
        keep = torch.ones(old.numel(), dtype=torch.bool).index_fill_(0, selected, False)
        assert torch.equal(old.reshape(-1)[keep], new.detach().reshape(-1)[keep])
    b.train_steps(1)
    trained = [p.detach().clone() for p in b.parameters()]
    assert not apply_delivery(b, delivery)  # sent again (its reply was lost): skipped
    assert all(torch.equal(x, y) for x, y in zip(trained, b.parameters(), strict=True))
    with pytest.raises(ValueError, match=re.escape("unexpected ['momentum_buffer']")):
        apply_delivery(b, Delivery("values", 2, {"momentum_buffer": sent["weights"]}))


def test_exchange_digest_tells_different_deliveries_apart() -> None:
    one = Exchange({0: Delivery("values", 1, {"weights": torch.zeros(3)})})
    two = Exchange({0: Delivery("values", 1, {"weights": torch.tensor([0.0, 0.0, 1e-7])})})
    assert one.digest != two.digest
    assert one.digest == Exchange({0: Delivery("values", 1, {"weights": torch.zeros(3)})}).digest
