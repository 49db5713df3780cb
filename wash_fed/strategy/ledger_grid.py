"""A Grid that records every message it carries in the run's byte ledger.

Every strategy -- ours and Flower's own FedAvg -- talks to the nodes through this wrapper,
so all of them are counted the same way: each message sent and each reply received, with
its size as Flower serializes it (:func:`wash_fed.wire.message_bytes`), the round it belongs
to, the member (partition id) and the phase -- and how long each message was in flight,
from its push to the pull of its reply (:mod:`wash_fed.timing` splits rounds with it). A
training round stops waiting for its last members by the rule of
:class:`~wash_fed.timing.StragglerWait`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid import InMemoryGrid

from wash_fed import wire
from wash_fed.config import RuntimeConfig
from wash_fed.keys import Config, MessageType, Record, Reply
from wash_fed.ledger import Direction, Ledger
from wash_fed.timing import RoundTime, StragglerWait, split_round

__all__ = ["LedgerGrid", "phase_of"]

_PHASES = {
    MessageType.TRAIN: "train",
    MessageType.HELLO: "setup",
    MessageType.COLLECT: "collect",
    MessageType.BN_STATISTICS: "bn",
    MessageType.EVALUATE: "evaluate",
    MessageType.END: "end",
}


def phase_of(message_type: str) -> str:
    """The ledger phase of a message type (its own name when it is not one of ours)."""
    return _PHASES.get(message_type, message_type)


def _reply_phase(message: Message) -> str:
    """The ledger phase of the reply to ``message``: its message type's, but ``collect`` for
    a last training round's reply, which carries the member's whole model for the final
    step (:data:`wash_fed.keys.Reply.FINAL`)."""
    config = message.content.config_records.get(Record.CONFIG)
    if config is not None and config.get(Config.REPLY) == Reply.FINAL:
        return _PHASES[MessageType.COLLECT]
    return phase_of(message.metadata.message_type)


def _round_of(content: RecordDict) -> int:
    """The round a message belongs to, from its config's ``server-round`` (0 if absent)."""
    for record in content.config_records.values():
        if Config.SERVER_ROUND in record:
            return int(record[Config.SERVER_ROUND])  # type: ignore[arg-type]
    return 0


class LedgerGrid(Grid):
    """Delegates to ``grid`` and records each message in ``ledger``.

    ``members`` maps node ids to partition ids, as the server's roster binds them
    (:meth:`bind`), never as a reply claims; a message to a node not (yet) bound is recorded
    for member -1 until it is. Replies are polled every ``poll_interval`` seconds; a training
    round waits for its last members as ``stragglers`` says (None: until the timeout).
    ``on_exchange(round, phase, time)`` is called after every recorded exchange (the run's
    record listens there), with where the time of an exchange outside training went
    (:func:`wash_fed.timing.split_round`; None for training, whose rounds the strategy
    times with its own work: :meth:`take_in_flight`).
    """

    def __init__(
        self,
        grid: Grid,
        ledger: Ledger,
        on_exchange: Callable[[int, str, RoundTime | None], None] | None = None,
        poll_interval: float = 0.5,
        stragglers: StragglerWait | None = None,
    ) -> None:
        self._grid = grid
        self.poll_interval = poll_interval
        self.stragglers = stragglers
        self.ledger = ledger
        self.members: dict[int, int] = {}
        self._unbound: dict[int, list[int]] = {}
        """Node id -> the ledger entries recorded for it before it was bound."""
        self._on_exchange = on_exchange
        self._pushed: dict[str, tuple[Message, float]] = {}
        """Message id -> the message and when it was pushed, until its reply arrives."""
        self.in_flight: dict[tuple[int, str], dict[int, float]] = {}
        """(round, phase) -> node id -> seconds from push to reply of its delivered messages
        (:meth:`take_in_flight` hands out training's)."""
        self._reported: dict[tuple[int, str], dict[int, dict[str, object]]] = {}
        """(round, phase) -> node id -> its reply's metrics, outside training."""

    @classmethod
    def for_run(
        cls,
        grid: Grid,
        ledger: Ledger,
        runtime: RuntimeConfig,
        on_exchange: Callable[[int, str, RoundTime | None], None] | None = None,
    ) -> LedgerGrid:
        """``grid`` polled and waiting for stragglers as the run's ``runtime`` says."""
        return cls(
            grid,
            ledger,
            on_exchange,
            poll_interval=runtime.poll_interval,
            stragglers=runtime.stragglers,
        )

    @property
    def simulated(self) -> bool:
        """Whether ``grid`` is Flower's simulation's: its members run in this host's
        backend, and no message crosses a link."""
        return isinstance(self._grid, InMemoryGrid)

    # --- delegation -------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        pushed = time.monotonic()
        self._pushed.update((i, (m, pushed)) for i, m in zip(ids, messages, strict=True))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._settle(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull replies every ``poll_interval`` seconds until all are in, the
        timeout passes, or (training) the stragglers' wait is over (Flower's own loop waits
        a fixed 3 s between pulls)."""
        messages = list(messages)
        if not messages:
            return []
        started = time.monotonic()
        pending = set(self.push_messages(messages))
        waits = self.stragglers if messages[0].metadata.message_type == MessageType.TRAIN else None
        majority: float | None = None
        replies: list[Message] = []
        while pending:
            arrived = list(self.pull_messages(pending))
            replies += arrived
            pending -= {reply.metadata.reply_to_message_id for reply in arrived}
            elapsed = time.monotonic() - started
            if majority is None and 2 * len(replies) > len(messages):
                majority = elapsed
            limit = waits.deadline(len(replies), len(messages), majority) if waits else None
            if not pending or (timeout is not None and elapsed >= timeout):
                break
            if limit is not None and elapsed >= limit:
                self._stop_waiting(messages, pending, elapsed, majority)
                break
            time.sleep(self.poll_interval)
        for message_id in pending:  # no reply: nothing confirms that it reached its node
            self._pushed.pop(message_id, None)
        round_, phase = _round_of(messages[0].content), phase_of(messages[0].metadata.message_type)
        split = None if phase == "train" else self._split(round_, phase, time.monotonic() - started)
        if self._on_exchange is not None:
            self._on_exchange(round_, phase, split)
        return replies

    def _split(self, round_: int, phase: str, seconds: float) -> RoundTime:
        """Where an exchange outside training spent its ``seconds``, from its messages'
        flights and its replies' metrics (forgotten once split)."""
        flights = self.in_flight.pop((round_, phase), {})
        reported = self._reported.pop((round_, phase), {})
        return split_round(seconds, flights, reported, simulated=self.simulated)

    def _stop_waiting(
        self, messages: list[Message], pending: set[str], elapsed: float, majority: float | None
    ) -> None:
        """Say which members a training round stopped waiting for, and by which rule."""
        late = sorted(
            self.members.get(self._pushed[i][0].metadata.dst_node_id, -1)
            for i in pending
            if i in self._pushed
        )
        log(
            WARNING,
            "round %d: stopped waiting for member(s) %s after %.1f s; more than half of the "
            "members had replied at %.1f s (straggler-factor, straggler-min-wait)",
            _round_of(messages[0].content),
            ", ".join(map(str, late)),
            elapsed,
            majority or 0.0,
        )

    # --- bookkeeping ------------------------------------------------------------------

    def _settle(self, replies: Iterable[Message]) -> None:
        """Record each message whose reply shows that it reached its node, and the reply.

        Errors the SuperLink makes itself (an unavailable node, an expired message) are not
        traffic of a member: neither they nor the message they answer are recorded.
        """
        arrived = time.monotonic()
        for reply in replies:
            pushed = self._pushed.pop(reply.metadata.reply_to_message_id, None)
            if pushed is None or reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                continue
            msg, pushed_at = pushed
            node = msg.metadata.dst_node_id
            round_ = _round_of(msg.content)
            phase = phase_of(msg.metadata.message_type)
            self._record(msg, "down", node, round_, phase)
            self._record(reply, "up", node, round_, _reply_phase(msg))
            self.in_flight.setdefault((round_, phase), {})[node] = arrived - pushed_at
            metrics = (
                None if reply.has_error() else reply.content.metric_records.get(Record.METRICS)
            )
            if phase != "train" and metrics is not None:
                self._reported.setdefault((round_, phase), {})[node] = dict(metrics)

    def take_in_flight(self, round_: int) -> dict[int, float]:
        """Per partition id, the seconds its training message of ``round_`` was in flight
        (push to reply), forgotten once taken."""
        flights = self.in_flight.pop((round_, "train"), {})
        return {self.members.get(node, -1): seconds for node, seconds in flights.items()}

    def bind(self, node: int, partition: int) -> None:
        """Node ``node`` holds member ``partition``: its messages are that member's from now
        on, and so are those recorded for it before (its hello)."""
        self.members[node] = partition
        self.ledger.attribute(self._unbound.pop(node, []), partition)

    def _record(
        self, msg: Message, direction: Direction, node_id: int, round_: int, phase: str
    ) -> None:
        member = self.members.get(node_id)
        if member is None:
            self._unbound.setdefault(node_id, []).append(len(self.ledger.entries))
        self.ledger.record(
            round_, -1 if member is None else member, direction, phase, wire.message_bytes(msg)
        )
