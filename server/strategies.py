"""Population strategies -- WASH, PAPA and independent members -- as Flower strategies.

Unlike FedAvg there is no global model: every member keeps its own weights, and each node
gets its own message every round. Flower's ``Strategy.start`` drives the rounds; a strategy
decides what each member must send back (``reply_for``) and what it does with the replies
(``exchange``), which produces the *deliveries* each member applies at the start of its next
message. A delivery stays due until the member acknowledges it with a successful reply, so
a member that fails a round loses nothing and takes nobody's values with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.papa import population_mean
from wash_fed.shuffle import shuffle_values
from wash_fed.training import wash_mask

__all__ = [
    "Delivery",
    "EnsembleStrategy",
    "PapaStrategy",
    "PopulationStrategy",
    "RoundReport",
    "WashStrategy",
    "make_population_strategy",
]


@dataclass
class Delivery:
    """What a member must apply before its next round: payload records and config entries."""

    records: dict[str, ArrayRecord] = field(default_factory=dict)
    config: dict[str, int | str] = field(default_factory=dict)


@dataclass
class RoundReport:
    """One round as the server saw it."""

    round: int
    metrics: dict[int, dict[str, Any]]
    """Per partition id: the metrics its member reported."""
    failed: dict[int, str]
    """Per node id of a member that did not answer properly: why."""
    seconds: float
    exchange: dict[str, int]
    """What the strategy moved (WASH: ``selected``, ``moved``, ``participants``)."""

    def member_means(self) -> dict[str, float]:
        """Each numeric metric averaged over the members that reported it (partition ids
        left out)."""
        rows = list(self.metrics.values())
        keys = {k for row in rows for k, v in row.items() if isinstance(v, (int, float))}
        keys.discard("partition-id")
        means = {}
        for key in sorted(keys):
            values = [float(r[key]) for r in rows if key in r]
            means[key] = sum(values) / len(values)
        return means


class PopulationStrategy(Strategy):
    """Base class: per-member messages, deliveries, round reports. See the module docstring.

    ``members`` maps node ids to partition ids. ``on_round`` is called with each round's
    report (progress, results on disk, metrics).
    """

    label = "population"

    def __init__(
        self,
        cfg: WashFedConfig,
        members: Mapping[int, int],
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.members = dict(sorted(members.items(), key=lambda item: item[1]))
        self.deliveries: dict[int, Delivery] = {}
        self.history: list[RoundReport] = []
        self._on_round = on_round
        self._round_started = 0.0

    # --- what subclasses decide ---------------------------------------------------------

    def reply_for(self, server_round: int) -> str:
        """What every member sends back from round ``server_round`` (``wire.REPLY_*``)."""
        return wire.REPLY_METRICS

    def exchange(self, server_round: int, replies: dict[int, RecordDict]) -> dict[str, int]:
        """Act on the successful replies (node id -> content, in partition order): set the
        deliveries of the next round. Returns counts for the round report."""
        return {}

    # --- Flower's Strategy interface ----------------------------------------------------

    def summary(self) -> None:
        log(
            INFO,
            "\t├── %s over %d members (partition ids %s)",
            self.label,
            len(self.members),
            sorted(self.members.values()),
        )
        log(INFO, "\t└── %d local steps per round", self.cfg.local_steps)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        every = self.cfg.eval_every
        evaluate = every > 0 and (
            server_round % every == 0 or server_round == self.cfg.num_server_rounds
        )
        base = {**config, "reply": self.reply_for(server_round), "evaluate": evaluate}
        return [self._message(node, MessageType.TRAIN, server_round, base) for node in self.members]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, failed = self._split(replies)
        for node in ok:
            self.deliveries.pop(node, None)  # acknowledged: it was applied before training
        exchange = self.exchange(server_round, ok)
        metrics = {self.members[node]: dict(content[wire.METRICS]) for node, content in ok.items()}
        report = RoundReport(
            server_round, metrics, failed, time.perf_counter() - self._round_started, exchange
        )
        self.history.append(report)
        if self._on_round is not None:
            self._on_round(report)
        return None, MetricRecord(dict(report.member_means()))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # members report test accuracy with their training replies

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    # --- the final step -----------------------------------------------------------------

    def collect(self, grid: Grid, timeout: float) -> dict[int, dict[str, Tensor]]:
        """Deliver what is still due and collect every member's full state dict.

        Returns the state dicts by partition id; members that fail are left out (logged).
        """
        final_round = self.cfg.num_server_rounds + 1
        messages = [self._message(node, wire.COLLECT, final_round, {}) for node in self.members]
        ok, _ = self._split(grid.send_and_receive(messages, timeout=timeout))
        return {
            self.members[node]: wire.record_to_tensors(content.array_records[wire.ARRAYS])
            for node, content in ok.items()
        }

    # --- helpers ------------------------------------------------------------------------

    def _message(
        self, node: int, message_type: str, server_round: int, config: Mapping[str, Any]
    ) -> Message:
        delivery = self.deliveries.get(node, Delivery())
        record = {**config, **delivery.config}
        return wire.message(node, message_type, server_round, record, delivery.records)

    def _split(self, replies: Iterable[Message]) -> tuple[dict[int, RecordDict], dict[int, str]]:
        """Successful replies by node id (in partition order), and the failures with reasons."""
        answered: dict[int, RecordDict] = {}
        failed: dict[int, str] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[node] = str(reply.error.reason)
            else:
                answered[node] = reply.content
        for node in self.members:
            if node not in answered and node not in failed:
                failed[node] = "no reply before the round timeout"
        for node, reason in failed.items():
            log(WARNING, "member %s (node %d) failed: %s", self.members.get(node), node, reason)
        ok = {node: answered[node] for node in self.members if node in answered}
        return ok, failed


class EnsembleStrategy(PopulationStrategy):
    """Independent members: no communication until the final collection."""

    label = "ensemble"


class WashStrategy(PopulationStrategy):
    """WASH: after each round, one shuffle event among the members that answered."""

    label = "wash"

    def __init__(
        self,
        cfg: WashFedConfig,
        members: Mapping[int, int],
        numels: list[int],
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        super().__init__(cfg, members, on_round)
        self.numels = numels

    def reply_for(self, server_round: int) -> str:
        return wire.REPLY_VALUES

    def exchange(self, server_round: int, replies: dict[int, RecordDict]) -> dict[str, int]:
        expected = wash_mask(self.cfg, self.numels, server_round).num_selected
        values: dict[int, dict[str, Tensor]] = {}
        for node, content in replies.items():
            sent = wire.record_to_tensors(content.array_records[wire.VALUES])
            problem = _check_values(sent, expected)
            if problem:  # leave this member out of the event; everyone else carries on
                log(
                    WARNING,
                    "member %d left out of shuffle event %d: %s",
                    self.members[node],
                    server_round,
                    problem,
                )
                continue
            values[node] = sent
        if len(values) < 2:
            log(
                WARNING,
                "shuffle event %d skipped: %d member(s) took part",
                server_round,
                len(values),
            )
            return {"selected": expected, "moved": 0, "participants": len(values)}
        received, moved = shuffle_values(
            list(values.values()), seed=self.cfg.seed, event=server_round
        )
        for node, mine in zip(values, received, strict=True):
            self.deliveries[node] = Delivery(
                {wire.VALUES: wire.tensors_to_record(mine)}, {"values-event": server_round}
            )
        return {"selected": expected, "moved": moved, "participants": len(values)}


def _check_values(sent: Mapping[str, Tensor], expected: int) -> str | None:
    for kind, v in sent.items():
        if tuple(v.shape) != (expected,):
            return f"{kind!r} has shape {tuple(v.shape)}, the mask selects {expected}"
        if not bool(v.isfinite().all()):
            return f"{kind!r} holds non-finite values"
    return None


class PapaStrategy(PopulationStrategy):
    """PAPA: every ``papa-every`` rounds, members send their weights and are pulled toward
    the mean (``papa-all``: replaced by it) before their next round."""

    label = "papa"

    def reply_for(self, server_round: int) -> str:
        due = server_round % self.cfg.papa_every == 0
        return wire.REPLY_WEIGHTS if due else wire.REPLY_METRICS

    def exchange(self, server_round: int, replies: dict[int, RecordDict]) -> dict[str, int]:
        if server_round % self.cfg.papa_every or not replies:
            return {}
        weights = [wire.record_to_tensors(c.array_records[wire.ARRAYS]) for c in replies.values()]
        names = list(weights[0])
        mean = population_mean([[w[n] for n in names] for w in weights])
        record = wire.tensors_to_record(dict(zip(names, mean, strict=True)))
        for node in self.members:
            self.deliveries[node] = Delivery({wire.MEAN: record})
        return {"averaged": len(weights)}


def make_population_strategy(
    cfg: WashFedConfig,
    members: Mapping[int, int],
    numels: list[int],
    on_round: Callable[[RoundReport], None] | None = None,
) -> PopulationStrategy:
    """The strategy object for ``cfg.strategy`` (anything but ``fedavg``)."""
    if cfg.strategy == "wash":
        return WashStrategy(cfg, members, numels, on_round)
    if cfg.strategy in ("papa", "papa-all"):
        strategy = PapaStrategy(cfg, members, on_round)
        strategy.label = cfg.strategy
        return strategy
    if cfg.strategy == "ensemble":
        return EnsembleStrategy(cfg, members, on_round)
    raise ValueError(f"no population strategy for {cfg.strategy!r}")
