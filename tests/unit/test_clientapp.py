"""The public member, around a task that is not the built-in one: a small sequence
classifier (a GRU, no BatchNorm) trained by its own loop with AdamW. It answers every message
of the member protocol on Flower records, moves AdamW's moments with WASH+Opt, and continues
in another process from its state."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import pytest
import torch
from flwr.app import ConfigRecord, ConfigRecordValues, RecordDict
from torch import Tensor, nn

from tests.unit.small_configs import three_members
from wash_fed import wire
from wash_fed.clientapp import ExampleCounts, TaskError, TrainRound, WashMember
from wash_fed.keys import Config, Info, MessageType, Metric, Metrics, Record, Reply, Split
from wash_fed.member import PopulationMember

SETTINGS = three_members(**{"shuffle-optimizer-state": True}).member_settings


class Parity(nn.Module):
    """Is the sum of a sequence of bits odd? A GRU reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 16, batch_first=True)
        self.out = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        _, last = self.gru(x.unsqueeze(-1))
        logits: Tensor = self.out(last[-1])
        return logits


class ParityTask:
    """The caller's own task: data of its own, a loop of its own, a state of its own."""

    def __init__(self, seed: int, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 2, (256, 6), generator=generator).float()
        self.y = self.x.sum(1).long() % 2
        self.rounds = 0

    def train(self, model: nn.Module, round_: TrainRound) -> Metrics:
        loss = nn.functional.cross_entropy(model(self.x), self.y)
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.rounds += 1
        return {Metric.LOSS: float(loss.detach()), "rounds-here": self.rounds}

    def evaluate(self, model: nn.Module, split: str) -> Metrics | None:
        if split != Split.TEST:
            return None
        with torch.no_grad():
            correct = (model(self.x).argmax(1) == self.y).float().mean()
        return {Metric.ACCURACY: float(correct), Metric.NUM_EXAMPLES: len(self.y)}

    def bn_inputs(self, batches: int) -> Iterator[Tensor]:
        yield self.x

    def examples(self) -> ExampleCounts:
        return ExampleCounts(train=len(self.y), test=len(self.y))

    def state_dict(self) -> dict[str, object]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.rounds = int(str(state["rounds"]))


def wash_member(index: int) -> WashMember:
    torch.manual_seed(0)
    model = Parity()
    optimizer = torch.optim.AdamW(model.parameters())
    member = PopulationMember(SETTINGS, index, model, torch.device("cpu"), optimizer)
    return WashMember(member, ParityTask(index, optimizer))


def message(server_round: int, **config: int | bool | str) -> RecordDict:
    return RecordDict({Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: server_round, **config})})


def test_a_task_of_its_own_answers_every_message() -> None:
    member = wash_member(1)
    hello = member.handle(MessageType.HELLO, message(0, **{Config.CREDENTIAL: "k"}))
    info = hello.config_records[Record.INFO]
    assert info[Info.CREDENTIAL] == "k" and not info[Info.RESUMED]
    assert wire.metric(hello, Metric.NUM_EXAMPLES) == 256
    trained = member.handle(MessageType.TRAIN, message(1, **{Config.REPLY: Reply.VALUES}))
    assert wire.metric(trained, "rounds-here") == 1 and wire.metric(trained, Metric.LOSS) > 0
    values = wire.record_to_tensors(trained.array_records[Record.VALUES])
    assert set(values) == {"weights", "exp_avg", "exp_avg_sq"}, "AdamW's moments travel"
    assert all(v.numel() == member.member.shuffle_mask(1).num_selected for v in values.values())
    collected = member.handle(MessageType.COLLECT, message(2, **{Config.EVALUATE: True}))
    state = wire.record_to_tensors(collected.array_records[Record.ARRAYS])
    assert state.keys() == member.member.model.state_dict().keys()
    assert 0.0 <= wire.metric(collected, Metric.TEST_ACCURACY) <= 1.0
    soup = RecordDict(
        {
            Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: 2, Config.PATCH: False}),
            Record.ARRAYS: wire.tensors_to_record(state),
        }
    )
    stats = member.handle(MessageType.BN_STATISTICS, soup)
    assert dict(stats.array_records[Record.STATS]) == {}, "no BatchNorm: nothing to merge"
    ended = member.handle(MessageType.END, soup)
    assert wire.metric(ended, Metric.ACCURACY) == wire.metric(collected, Metric.TEST_ACCURACY)


def test_the_member_continues_in_another_process_from_its_state() -> None:
    first = wash_member(2)
    first.handle(MessageType.HELLO, message(0, **{Config.CREDENTIAL: "k"}))
    first.handle(MessageType.TRAIN, message(1, **{Config.REPLY: Reply.METRICS}))
    blob = first.state_bytes()
    second = wash_member(2)
    second.load_state_bytes(blob)
    assert second.credential == "k" and second.task.state_dict() == {"rounds": 1}
    for name, tensor in first.member.model.state_dict().items():
        assert torch.equal(tensor, second.member.model.state_dict()[name]), name
    assert second.member.optimizer is not None
    assert second.member.optimizer.state_dict()["state"], "AdamW's moments came along"


def test_a_message_of_another_kind_is_named() -> None:
    with pytest.raises(ValueError, match=r"no handler for message type 'query\.unknown'"):
        wash_member(0).handle("query.unknown", message(1))


def test_the_hello_names_the_parameters_and_the_moments_that_move() -> None:
    hello = wash_member(0).handle(MessageType.HELLO, message(0))
    info = hello.config_records[Record.INFO]
    names = [name for name, _ in Parity().named_parameters()]
    assert json.loads(str(info[Info.PARAMETERS])) == names
    assert json.loads(str(info[Info.STATE_KINDS])) == ["exp_avg", "exp_avg_sq"]


def test_a_hello_with_other_settings_is_refused_naming_them() -> None:
    hello = message(0)
    theirs: dict[str, ConfigRecordValues] = {"shuffle-prob": 0.3, "seed": 7}
    hello[Record.SETTINGS] = ConfigRecord({**SETTINGS.to_mapping(), **theirs})
    with pytest.raises(ValueError, match=r"seed=7 \(the member has 0\), shuffle-prob=0\.3"):
        wash_member(0).handle(MessageType.HELLO, hello)


def test_what_the_task_raises_names_the_member_and_the_function() -> None:
    member = wash_member(1)

    def broken(model: nn.Module, round_: TrainRound) -> Metrics:
        raise KeyError("lr")

    member.task.train = broken  # type: ignore[method-assign]
    with pytest.raises(TaskError, match=r"member 1: ParityTask\.train raised KeyError: 'lr'"):
        member.handle(MessageType.TRAIN, message(1, **{Config.REPLY: Reply.VALUES}))
