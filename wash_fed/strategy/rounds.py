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
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from wash_fed import wire
from wash_fed.batchnorm import running_statistics
from wash_fed.config import WashFedConfig
from wash_fed.gate import Quarantine, check_model
from wash_fed.keys import Config, MessageType, Metrics, Record, Reply
from wash_fed.protocol import Exchange, ServerProtocol, final_format, round_reply
from wash_fed.strategy.replies import Replies, gather, reply_gate
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.state import RoundReport, StrategyState

__all__ = ["PopulationStrategy"]


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
        *,
        members_test: bool = False,
    ) -> None:
        self.cfg = cfg
        self.roster = roster
        self.protocol = protocol
        self.state = StrategyState(Quarantine(cfg.gate.quarantine_after))
        self.gate = reply_gate(cfg.gate)
        self.members_test = members_test
        """Whether the members evaluate the models they hand over on their own test data
        (the server has none): their last-round replies carry the accuracy."""
        self.final_models = Replies()
        """The last round's replies: the members' whole models as the gate admitted them,
        and why it left others out (the final step collects them)."""
        self._on_round = on_round
        self._round_started = 0.0

    def continue_from(self, state: StrategyState) -> None:
        """Take up a run where ``state`` (from the server's checkpoint) left it; its members
        continue from their own checkpoints."""
        self.state = state
        for partition in sorted(state.quarantine.quarantined):
            self.roster.quarantine(partition)

    # --- Flower's Strategy interface ----------------------------------------------------

    def summary(self) -> None:
        log(INFO, "\t├── %s over %d members", self.cfg.label, len(self.roster.nodes))
        log(INFO, "\t└── replies awaited %g s a round", self.cfg.runtime.round_timeout)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.state.rounds_done
        self._round_started = time.perf_counter()
        self.state.missing -= set(self.roster.readmit(grid, self.state.missing))
        reply = round_reply(self.protocol, server_round)
        base = {
            **config,
            Config.REPLY: reply,
            Config.EVALUATE: self.cfg.evaluates_at(server_round)
            or (reply == Reply.FINAL and self.members_test),
            Config.CHECKPOINTED_ROUND: self.state.checkpointed,
        }
        messages = self.messages(MessageType.TRAIN, server_round, base)
        self.protocol.prepare(server_round, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.state.rounds_done
        reply = round_reply(self.protocol, server_round)
        final = reply == Reply.FINAL
        reference = self.roster.reference
        got = gather(
            replies,
            self.roster.nodes,
            wire.payload_record(reply),
            f"round {server_round}",
            (lambda tensors: final_format(self.cfg).decode(tensors, reference))
            if final
            else (lambda tensors: self.protocol.read(server_round, tensors)),
        )
        answered = got.answered()
        self._note_missing(got)
        admission = self.gate.admit(
            got.accepted,
            (lambda parts: check_model(parts.tensors, reference))
            if final
            else (lambda parts: self.protocol.payload_problem(server_round, parts.tensors)),
            what=f"round {server_round}, "
            + ("left out of the soup" if final else "left out of its exchange"),
            values=lambda parts: parts.tensors,
            earlier=got.rejected,
            quarantine=self.state.quarantine,
            errored=got.errored,
            statistics=running_statistics(self.roster.reference) if final else (),
        )
        got.admitted(admission)
        for partition in admission.quarantined:  # sent nothing more, left out of the soup
            self.roster.quarantine(partition)
            self.state.missing.discard(partition)
        if final:  # the replies' parts, not their records
            self.final_models = Replies(accepted=got.accepted, rejected=got.rejected)
            exchange = Exchange({})
        else:
            exchange = self._exchange(server_round, got.accepted)
        self.state.deliveries.settle(answered, exchange)
        report = RoundReport(
            server_round,
            {p: parts.metrics for p, parts in got.accepted.items()},
            got.failed,
            time.perf_counter() - self._round_started,
            exchange.counts,
            exchange.digest,
            got.rejected,
        )
        self.state.history.append(report)
        if self._on_round is not None:
            self._on_round(report)
        return None, MetricRecord(dict(report.member_means()))

    def _exchange(self, server_round: int, accepted: Mapping[int, wire.ReplyParts]) -> Exchange:
        """The round's exchange of the admitted payloads, its deliveries held as the records
        that carry them (:func:`wash_fed.wire.hold_as_records`). The exchange may reuse the
        payloads' tensors: they are the deliveries' from then on, no longer the replies'."""
        payloads = {p: parts.tensors for p, parts in accepted.items()}
        exchange = self.protocol.exchange(server_round, payloads)
        for tensors in payloads.values():
            tensors.clear()
        wire.hold_as_records(exchange.deliveries)
        return exchange

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
        self, grid: Grid, reference: Mapping[str, Tensor], own_tests: bool
    ) -> tuple[dict[int, dict[str, Tensor]], dict[int, Metrics], dict[int, str]]:
        """Every member's full state dict (and, with ``own_tests``, its accuracy on its own
        test data): those the last round's replies carried, and from the others that did
        not answer it (a resumed run, a member that failed) a collect message, which first
        delivers what is still due to them. Those asked are judged by the gate together with
        those already collected.

        Returns the state dicts and metrics of the replies that pass the gate (the model's
        entries ``reference``, finite, not far from the others'), by partition id, and why
        every other member is left out (logged, one line each).
        """
        got = self.final_models
        self.state.missing -= set(self.roster.readmit(grid, self.state.missing))
        asked = {
            partition: node
            for partition, node in self.roster.nodes.items()
            if partition not in got.accepted and partition not in got.rejected
        }
        if asked:
            got = self._collect_from(grid, asked, reference, own_tests)
        return (
            {p: parts.tensors for p, parts in got.accepted.items()},
            {p: parts.metrics for p, parts in got.accepted.items()},
            {p: f"collect: {reason}" for p, reason in got.rejected.items()},
        )

    def _collect_from(
        self, grid: Grid, asked: Mapping[int, int], reference: Mapping[str, Tensor], own_tests: bool
    ) -> Replies:
        """The collect message round to the members ``asked`` (partition id to node id),
        its replies admitted by the gate together with the last round's."""
        log(INFO, "final step: collecting %d members' models", len(asked))
        config = {Config.CHECKPOINTED_ROUND: self.state.checkpointed, Config.EVALUATE: own_tests}
        messages = self.messages(MessageType.COLLECT, self.cfg.final_round, config, asked)
        replies = grid.send_and_receive(messages, timeout=self.cfg.runtime.round_timeout)
        got = gather(
            replies,
            asked,
            Record.ARRAYS,
            "the final collection",
            lambda tensors: final_format(self.cfg).decode(tensors, reference),
        )
        self._note_missing(got)
        self.state.deliveries.settle(got.answered(), Exchange({}))
        earlier = self.final_models
        got.accepted = dict(sorted({**earlier.accepted, **got.accepted}.items()))
        got.admitted(
            self.gate.admit(
                got.accepted,
                lambda parts: check_model(parts.tensors, reference),
                what="the final collection, left out of the soup",
                values=lambda parts: parts.tensors,
                earlier=got.rejected,
                statistics=running_statistics(reference),
            )
        )
        got.rejected |= earlier.rejected  # logged in the last round
        return got

    # --- helpers ------------------------------------------------------------------------

    def messages(
        self,
        message_type: str,
        server_round: int,
        config: Mapping[str, wire.ConfigValue],
        nodes: Mapping[int, int] | None = None,
    ) -> list[Message]:
        """One message per member (of ``nodes``, partition id to node id; default: the
        roster's), each with what is due to it."""
        messages = []
        for partition, node in sorted((self.roster.nodes if nodes is None else nodes).items()):
            records, entries = wire.delivery_records(self.state.deliveries.due(partition))
            messages.append(
                wire.message(
                    node,
                    message_type,
                    server_round,
                    {**config, **entries},
                    records,
                    ttl=self.cfg.runtime.round_timeout,
                )
            )
        return messages

    def _note_missing(self, got: Replies) -> None:
        """Members that failed are missing (looked for under a new node id) until they
        answer again."""
        self.state.missing = (self.state.missing | set(got.failed)) - set(got.answered())
