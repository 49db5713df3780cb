"""The member a ClientApp keeps: WASH's member side on Flower messages, around a task of the
caller's own (a boundary module: it imports Flower).

A :class:`WashMember` holds a :class:`~wash_fed.member.PopulationMember` (the model, the
optimizer that trains it, the newest delivery applied) and a :class:`Task` (what the member
trains on and how), and answers every message of the member protocol:

* ``query.hello``: who it is, what it holds, the digest of its first mask and its model's
  layout, so the server can check every member before any training;
* ``train``: apply what the last exchange delivered, call :meth:`Task.train` for the round,
  reply with what the strategy asks (WASH's values at this round's mask, PAPA's weights,
  FedAvg's state, or metrics only; in the last round the whole model in ``final-dtype``,
  which the final step collects);
* ``query.collect``: apply what is still due, reply with the whole model in ``final-dtype``
  (the final step's collection of a member whose last-round reply the server lacks);
* ``query.bn_statistics``: BatchNorm statistics of the soup on :meth:`Task.bn_inputs`;
* ``evaluate`` and ``query.end``: :meth:`Task.evaluate` of the model the message carries
  (whole, or as a patch over the model the member kept from the previous message).

Everything it needs to continue in another process is in :meth:`WashMember.state_bytes`.
"""

from __future__ import annotations

import copy
import io
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypedDict, TypeVar, cast

import torch
from flwr.app import ConfigRecord, ConfigRecordValues, MetricRecord, MetricRecordValues, RecordDict
from torch import Tensor, nn

from wash_fed import wire
from wash_fed.batchnorm import bn_statistics
from wash_fed.config import MemberSettings
from wash_fed.keys import (
    Config,
    Info,
    MessageType,
    Metric,
    Metrics,
    Record,
    Reply,
    ReplyKind,
    Split,
)
from wash_fed.member import MemberState, PopulationMember
from wash_fed.models import model_layout
from wash_fed.protocol import apply_delivery, final_format, member_payload, wire_format

__all__ = ["ExampleCounts", "Task", "TaskError", "TrainRound", "WashMember", "WashMemberState"]

P = ParamSpec("P")
R = TypeVar("R")

REPLY_KINDS = (Reply.VALUES, Reply.WEIGHTS, Reply.STATE, Reply.METRICS, Reply.FINAL)


@dataclass(frozen=True)
class ExampleCounts:
    """How many examples a member holds: what it trains on, tests on, and holds out (the
    server weighs the members' evaluations and caps their BatchNorm batches by them)."""

    train: int
    test: int = 0
    holdout: int = 0


@dataclass(frozen=True)
class TrainRound:
    """What the server asks of one round of local training: its number and the entries of
    the message's config record (the strategy's own and those the ServerApp adds)."""

    server_round: int
    config: Mapping[str, ConfigRecordValues]


class Task(Protocol):
    """What a member trains on and how: the caller's own loop and data. The model each
    method gets is the member's own, the same object every time.

    Subclass it and write :meth:`train`, :meth:`evaluate` and :meth:`examples`; the others
    have defaults: no BatchNorm inputs (a model with BatchNorm layers needs them where the
    final step recalibrates, ``bn-recalibration``), no state of the task's own."""

    def train(self, model: nn.Module, round_: TrainRound) -> Metrics:
        """Train ``model`` in place for one round; its metrics (finite numbers)."""
        ...

    def evaluate(self, model: nn.Module, split: str) -> Metrics | None:
        """``model``'s figures on the member's ``split`` (``test``, or ``holdout`` for the
        greedy soup), with ``accuracy`` and ``num-examples``; None where it has no such
        data."""
        ...

    def examples(self) -> ExampleCounts:
        """How many examples the member holds (its evaluations weigh at most that many)."""
        ...

    def bn_inputs(self, batches: int) -> Iterable[Tensor]:
        """Up to ``batches`` input batches of the member's own data, always the same ones,
        for the soup's BatchNorm statistics."""
        raise RuntimeError(
            f"{type(self).__name__} gives no inputs for BatchNorm statistics (bn_inputs): "
            "write it, or set bn-recalibration=false"
        )

    def state_dict(self) -> dict[str, object]:
        """What the task itself carries from one message to the next (a data position, a
        schedule); with :meth:`load_state_dict`, what lets it continue in another process."""
        return {}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Take up :meth:`state_dict` as another process wrote it."""
        return None


class TaskError(RuntimeError):
    """The member's task raised: the message names the member and the task's function."""


class WashMemberState(TypedDict):
    """A member as it continues in another process (:meth:`WashMember.state_dict`)."""

    member: MemberState
    task: dict[str, object]
    kept: dict[str, Tensor] | None
    credential: str
    resumed: bool


class WashMember:
    """A member of the population, answering the member protocol's messages around
    ``task``. Subclasses add what a runtime needs at a message's end (:meth:`after`): the
    built-in app's checkpoints."""

    def __init__(self, member: PopulationMember, task: Task) -> None:
        self.member = member
        self.task = task
        self.kept: dict[str, Tensor] | None = None
        """The model the server last sent in the final step (a soup), which a patch
        updates."""
        self.credential = ""
        """What the server issued this member at its first hello of the run ("": none yet)."""
        self.resumed = False
        """Whether the member was restored from a checkpoint of this run."""
        self.startup_seconds = 0.0
        """Building or restoring the member, reported once (``restore-seconds``)."""
        self._handlers: dict[str, Callable[[RecordDict], tuple[Metrics, RecordDict]]] = {
            MessageType.HELLO: self.hello,
            MessageType.TRAIN: self.train,
            MessageType.COLLECT: self.collect,
            MessageType.BN_STATISTICS: self.bn_statistics,
            MessageType.EVALUATE: self.evaluate,
            MessageType.END: self.end,
        }

    def handle(self, message_type: str, content: RecordDict) -> RecordDict:
        """The reply content to a message of ``message_type``."""
        handler = self._handlers.get(message_type)
        if handler is None:
            raise ValueError(f"no handler for message type {message_type!r}")
        started = time.perf_counter()
        metrics, reply = handler(content)
        metrics |= self.after(message_type, content)
        metrics |= {
            Metric.PARTITION_ID: self.member.index,
            Metric.RESTORE_SECONDS: self.startup_seconds,
            Metric.HANDLER_SECONDS: time.perf_counter() - started,
        }
        self.startup_seconds = 0.0
        record: dict[str, MetricRecordValues] = dict(metrics)
        reply[Record.METRICS] = MetricRecord(record)
        return reply

    def after(self, message_type: str, content: RecordDict) -> Metrics:
        """What the runtime does once a message is handled; the metrics it adds."""
        return {}

    # --- handlers: (metrics, other records of the reply) ---------------------------------

    def hello(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """Identity, holdings and the first mask's digest, before training. A member
        without a credential adopts the one the server issues; every hello shows it."""
        config = content.config_records[Record.CONFIG]
        if Record.SETTINGS in content.config_records:
            self._check_settings(content.config_records[Record.SETTINGS])
        resumed_round = self.resume(config)
        if not self.credential:
            self.credential = str(config.get(Config.CREDENTIAL, ""))
        mask = self.member.shuffle_mask(1)
        info = ConfigRecord(
            {
                Info.MASK_DIGEST: mask.digest(),
                Info.DEVICE: str(self.member.device),
                Info.TORCH: torch.__version__,
                Info.RESUMED: self.resumed,
                Info.CREDENTIAL: self.credential,
                Info.MODEL_LAYOUT: json.dumps(model_layout(self.member.model)),
                Info.STATE_KINDS: json.dumps(self.member.state_kinds()),
                Info.PARAMETERS: json.dumps([n for n, _ in self.member.model.named_parameters()]),
            }
        )
        examples = self._task_call("examples", self.task.examples)
        metrics: Metrics = {
            Metric.NUM_EXAMPLES: examples.train,
            Metric.TEST_EXAMPLES: examples.test,
            Metric.HOLDOUT_EXAMPLES: examples.holdout,
            Metric.MASK_SIZE: mask.num_selected,
            Metric.APPLIED_EVENT: self.member.applied_event,
            Metric.RESUMED_ROUND: resumed_round,
        }
        return metrics, RecordDict({Record.INFO: info})

    def resume(self, config: ConfigRecord) -> int:
        """Where a hello of a resumed run asks it, continue from a checkpoint; the round
        continued from (0: none)."""
        return 0

    def train(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """One round: apply the delivery, train, reply with what the server asked for."""
        config = content.config_records[Record.CONFIG]
        server_round = int(cast(int, config[Config.SERVER_ROUND]))
        reply = str(config.get(Config.REPLY, Reply.METRICS))
        if reply not in REPLY_KINDS:
            raise ValueError(f"{Config.REPLY}={reply!r}; expected one of {REPLY_KINDS}")
        self._apply(content)
        started = time.perf_counter()
        train_round = TrainRound(server_round, config)
        metrics = dict(self._task_call("train", self.task.train, self.member.model, train_round))
        metrics[Metric.TRAIN_SECONDS] = time.perf_counter() - started
        metrics |= self._own_test(config)
        payload = member_payload(self.member, cast(ReplyKind, reply), server_round)
        return metrics, RecordDict({**wire.payload_records(cast(ReplyKind, reply), payload)})

    def collect(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """Final step: apply what is still due, reply with the whole model in
        ``final-dtype`` (and, where the server asks, the member's accuracy on its own test
        data)."""
        self._apply(content)
        metrics = self._own_test(content.config_records[Record.CONFIG])
        state = final_format(self.member.settings).encode(self.member.model.state_dict())
        return metrics, RecordDict({Record.ARRAYS: wire.tensors_to_record(state)})

    def bn_statistics(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """BatchNorm statistics of the soup in ``arrays`` on this member's own data."""
        probe = copy.deepcopy(self.member.model)
        probe.load_state_dict(self._received_model(content))
        batches = self.member.settings.final.bn_batches
        inputs = self._task_call("bn_inputs", lambda: list(self.task.bn_inputs(batches)))
        stats = bn_statistics(probe, inputs)
        record = wire.bn_statistics_to_record(stats)
        return {Metric.BATCHES: stats.batches}, RecordDict({Record.STATS: record})

    def evaluate(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """The task's figures of the model in ``arrays`` on this member's test data, or its
        held-out data (``split``); none, and no examples, where it has no such data."""
        split = str(content.config_records[Record.CONFIG].get(Config.SPLIT, Split.TEST))
        received = self._received_model(content)
        model = self.member.model
        own = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(received)
        try:
            figures = self._task_call("evaluate", self.task.evaluate, model, split)
        finally:
            model.load_state_dict(own)
        return (dict(figures) if figures is not None else {Metric.NUM_EXAMPLES: 0}), RecordDict()

    def end(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """The run is over: a final model in ``arrays`` is evaluated first (as by
        :meth:`evaluate`)."""
        if Record.ARRAYS not in content.array_records:
            return {}, RecordDict()
        return self.evaluate(content)

    # --- state ---------------------------------------------------------------------------

    def state_dict(self) -> WashMemberState:
        """The member, its task's own state, the model it kept, and what the server knows
        it by."""
        return {
            "member": self.member.state_dict(),
            "task": self.task.state_dict(),
            "kept": self.kept,
            "credential": self.credential,
            "resumed": self.resumed,
        }

    def load_state_dict(self, state: WashMemberState) -> None:
        self.member.load_state_dict(state["member"])
        self.task.load_state_dict(state["task"])
        self.kept = state["kept"]
        self.credential = state["credential"]
        self.resumed = state["resumed"]

    def state_bytes(self) -> bytes:
        """:meth:`state_dict` as bytes (for ``context.state``)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_state_bytes(self, blob: bytes) -> None:
        loaded = torch.load(io.BytesIO(blob), map_location=self.member.device)
        self.load_state_dict(cast(WashMemberState, loaded))  # written by state_bytes()

    # --- helpers -------------------------------------------------------------------------

    def _task_call(
        self, name: str, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """``function(*args, **kwargs)``, the task's ``name``; what it raises becomes a
        :class:`TaskError` naming the member and the function."""
        try:
            return function(*args, **kwargs)
        except Exception as err:
            raise TaskError(
                f"member {self.member.index}: {type(self.task).__name__}.{name} raised "
                f"{type(err).__name__}: {err}"
            ) from err

    def _check_settings(self, record: ConfigRecord) -> None:
        """A ValueError naming every setting in which the server's ``record`` differs from
        the member's own."""
        theirs = MemberSettings.from_mapping(record).to_mapping()
        mine = self.member.settings.to_mapping()
        differ = [
            f"{k}={theirs[k]!r} (the member has {mine[k]!r})"
            for k in theirs
            if theirs[k] != mine[k]
        ]
        if differ:
            raise ValueError(
                f"the server's settings differ from this member's: {', '.join(differ)}"
            )

    def _own_test(self, config: ConfigRecord) -> Metrics:
        """The member's accuracy on its own test data, where the message asks for it
        (``evaluate``) and the member has some."""
        if not config.get(Config.EVALUATE, False):
            return {}
        tested = self._task_call("evaluate", self.task.evaluate, self.member.model, Split.TEST)
        if tested is None or Metric.ACCURACY not in tested:
            return {}
        return {Metric.TEST_ACCURACY: tested[Metric.ACCURACY]}

    def _apply(self, content: RecordDict) -> None:
        """Write what the server delivered: the protocol's delivery, or FedAvg's model."""
        delivery = wire.delivery_from_content(content)
        if delivery is not None:
            apply_delivery(self.member, delivery)
        if Record.ARRAYS in content.array_records:
            state = wire.record_to_tensors(content.array_records[Record.ARRAYS])
            model = self.member.model
            model.load_state_dict(
                wire_format(self.member.settings).decode(state, model.state_dict())
            )

    def _received_model(self, content: RecordDict) -> dict[str, Tensor]:
        """The model a final-step message carries, whole or (``patch``) as the tensors that
        differ from the one this member kept from the previous message; kept in turn."""
        sent = wire.record_to_tensors(content.array_records[Record.ARRAYS])
        like = self.member.model.state_dict()
        tensors = final_format(self.member.settings).decode_each(sent, like)
        if content.config_records[Record.CONFIG].get(Config.PATCH, False):
            if self.kept is None:
                raise ValueError("a patch arrived, but this member kept no model to apply it to")
            tensors = {**self.kept, **tensors}
        self.kept = tensors
        return tensors
