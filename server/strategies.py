"""The population strategies -- WASH, PAPA and independent members -- as one Flower strategy.

Unlike FedAvg there is no global model: every member keeps its own weights and each node
gets its own message every round. Flower's ``Strategy.start`` drives the rounds; what a
member sends and what the server delivers is the member protocol's
(:mod:`wash_fed.protocol`); this class converts records, keeps the deliveries due by
partition id, re-admits members that come back under a new node id, and reports rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from server.roster import Roster
from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.keys import Config, MessageType, Record
from wash_fed.protocol import Deliveries, Exchange, ServerProtocol

__all__ = ["PopulationStrategy", "RoundReport"]


@dataclass
class RoundReport:
    """One round as the server saw it."""

    round: int
    metrics: dict[int, dict[str, Any]]
    """Per partition id: the metrics its member reported."""
    failed: dict[int, str]
    """Per partition id of a member that did not answer properly: why."""
    seconds: float
    exchange: dict[str, int]
    """What the strategy moved (WASH: ``selected``, ``moved``, ``participants``)."""
    exchange_digest: str = ""
    """Fingerprint of the round's deliveries (:attr:`wash_fed.protocol.Exchange.digest`)."""

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
    """Per-member messages, deliveries, re-admission and round reports for a population
    protocol. ``on_round`` is called with each round's report (progress, results on disk,
    metrics)."""

    def __init__(
        self,
        cfg: WashFedConfig,
        roster: Roster,
        protocol: ServerProtocol,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.roster = roster
        self.protocol = protocol
        self.deliveries = Deliveries()
        self.history: list[RoundReport] = []
        self.missing: set[int] = set()
        """Partition ids whose last message failed."""
        self._on_round = on_round
        self._round_started = 0.0

    # --- Flower's Strategy interface ----------------------------------------------------

    def summary(self) -> None:
        log(INFO, "\t├── %s over %d members", self.cfg.label, len(self.roster.nodes))
        log(INFO, "\t└── %d local steps per round", self.cfg.local_steps)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        self.missing -= set(self.roster.readmit(grid, self.missing))
        every = self.cfg.eval_every
        evaluate = every > 0 and (
            server_round % every == 0 or server_round == self.cfg.num_server_rounds
        )
        base = {
            **config,
            Config.REPLY: self.protocol.reply_for(server_round),
            Config.EVALUATE: evaluate,
        }
        return self.messages(MessageType.TRAIN, server_round, base)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        answered, failed = self.split(replies)
        reply_kind = self.protocol.reply_for(server_round)
        payloads: dict[int, dict[str, Tensor]] = {}
        for partition, content in answered.items():
            try:
                payloads[partition] = wire.payload_from_content(reply_kind, content)
            except (TypeError, ValueError) as err:
                log(
                    WARNING,
                    "member %d: unusable reply in round %d: %s",
                    partition,
                    server_round,
                    err,
                )
        exchange = self.protocol.exchange(server_round, payloads)
        for partition, reason in exchange.rejected.items():
            log(
                WARNING,
                "member %d left out of round %d's exchange: %s",
                partition,
                server_round,
                reason,
            )
        self.deliveries.settle(answered, exchange)
        report = self._report(server_round, answered, failed, exchange)
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

    def collect(
        self, grid: Grid, timeout: float
    ) -> tuple[dict[int, dict[str, Tensor]], dict[int, dict[str, Any]]]:
        """Deliver what is still due and collect every member's full state dict.

        Returns the state dicts and the reported metrics, by partition id; members that
        fail are left out (logged).
        """
        final_round = self.cfg.num_server_rounds + 1
        self.missing -= set(self.roster.readmit(grid, self.missing))
        messages = self.messages(MessageType.COLLECT, final_round, {})
        answered, _ = self.split(grid.send_and_receive(messages, timeout=timeout))
        self.deliveries.settle(answered, Exchange({}))
        states, metrics = {}, {}
        for partition, content in answered.items():
            if Record.ARRAYS not in content.array_records:
                log(WARNING, "member %d: its collect reply holds no weights", partition)
                continue
            states[partition] = wire.record_to_tensors(content.array_records[Record.ARRAYS])
            metrics[partition] = dict(content.metric_records.get(Record.METRICS, MetricRecord()))
        return states, metrics

    # --- helpers ------------------------------------------------------------------------

    def messages(
        self, message_type: str, server_round: int, config: Mapping[str, Any]
    ) -> list[Message]:
        """One message per member, each with what is due to it."""
        messages = []
        for partition, node in sorted(self.roster.nodes.items()):
            records, entries = wire.delivery_records(self.deliveries.due(partition))
            messages.append(
                wire.message(
                    node,
                    message_type,
                    server_round,
                    {**config, **entries},
                    records,
                    ttl=self.cfg.round_timeout,
                )
            )
        return messages

    def split(self, replies: Iterable[Message]) -> tuple[dict[int, RecordDict], dict[int, str]]:
        """Successful replies by partition id (in order), and the failures with reasons.

        Members are known by the node the roster has for them; a reply from any other node
        is ignored. Every failure is logged once.
        """
        answered: dict[int, RecordDict] = {}
        failed: dict[int, str] = {}
        for reply in replies:
            partition = self.roster.partition_of(reply.metadata.src_node_id)
            if partition is None:
                continue
            if reply.has_error():
                failed[partition] = str(reply.error.reason)
            else:
                answered[partition] = reply.content
        for partition in self.roster.nodes:
            if partition not in answered and partition not in failed:
                failed[partition] = "no reply before the round timeout"
        for partition, reason in sorted(failed.items()):
            log(
                WARNING,
                "member %d (node %d) failed: %s",
                partition,
                self.roster.nodes[partition],
                reason,
            )
        self.missing = (self.missing | set(failed)) - set(answered)
        return dict(sorted(answered.items())), failed

    def _report(
        self,
        server_round: int,
        answered: Mapping[int, RecordDict],
        failed: dict[int, str],
        exchange: Exchange,
    ) -> RoundReport:
        metrics = {
            partition: dict(content.metric_records.get(Record.METRICS, MetricRecord()))
            for partition, content in answered.items()
        }
        return RoundReport(
            server_round,
            metrics,
            failed,
            time.perf_counter() - self._round_started,
            exchange.counts,
            exchange.digest,
        )
