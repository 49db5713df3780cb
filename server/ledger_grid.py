"""A Grid that records every message it carries in the run's byte ledger.

Every strategy -- ours and Flower's own FedAvg -- talks to the nodes through this wrapper,
so all of them are counted the same way: each message sent and each reply received, with
its size as Flower serializes it (:func:`wash_fed.wire.message_bytes`), the round it belongs
to, the member (partition id) and the phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from wash_fed import wire
from wash_fed.ledger import Direction, Ledger

__all__ = ["LedgerGrid", "phase_of"]

_PHASES = {
    "train": "train",
    wire.HELLO: "setup",
    wire.COLLECT: "collect",
    wire.BN_STATISTICS: "bn",
    "evaluate": "evaluate",
}


def phase_of(message_type: str) -> str:
    """The ledger phase of a message type (its own name when it is not one of ours)."""
    return _PHASES.get(message_type, message_type)


def _round_of(content: RecordDict) -> int:
    """The round a message belongs to, from its config's ``server-round`` (0 if absent)."""
    for record in content.config_records.values():
        if "server-round" in record:
            return int(record["server-round"])  # type: ignore[arg-type]
    return 0


class LedgerGrid(Grid):
    """Delegates to ``grid`` and records each message in ``ledger``.

    ``members`` maps node ids to partition ids; it learns them from the ``partition-id``
    metric every wash-fed reply carries. Replies are polled every ``poll_interval``
    seconds. ``on_exchange(round, phase)`` is called after every recorded exchange (the
    metrics exporter listens there).
    """

    def __init__(
        self,
        grid: Grid,
        ledger: Ledger,
        on_exchange: Callable[[int, str], None] | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self._grid = grid
        self.poll_interval = poll_interval
        self.ledger = ledger
        self.members: dict[int, int] = {}
        self._on_exchange = on_exchange
        self._rounds: dict[str, int] = {}  # pushed message id -> round, for pulled replies

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
        for msg, message_id in zip(messages, ids, strict=True):
            self._rounds[message_id] = _round_of(msg.content)
            self._record(msg, "down", msg.metadata.dst_node_id, self._rounds[message_id])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            self._learn(reply)
            round_ = self._rounds.pop(reply.metadata.reply_to_message_id, 0)
            self._record(reply, "up", reply.metadata.src_node_id, round_)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        replies = self._exchange(messages, timeout)
        for reply in replies:
            self._learn(reply)
        round_ = _round_of(messages[0].content)
        for msg in messages:
            self._record(msg, "down", msg.metadata.dst_node_id, round_)
        for reply in replies:
            self._record(reply, "up", reply.metadata.src_node_id, round_)
        if self._on_exchange is not None:
            self._on_exchange(round_, phase_of(messages[0].metadata.message_type))
        return replies

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Push, then pull replies every ``poll_interval`` seconds until all are in or the
        timeout passes (Flower's own loop waits a fixed 3 s between pulls)."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies += arrived
            pending -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies

    # --- bookkeeping ------------------------------------------------------------------

    def _learn(self, reply: Message) -> None:
        if reply.has_error():
            return
        for record in reply.content.metric_records.values():
            if "partition-id" in record:
                self.members[reply.metadata.src_node_id] = int(record["partition-id"])  # type: ignore[arg-type]

    def _record(self, msg: Message, direction: Direction, node_id: int, round_: int) -> None:
        self.ledger.record(
            round_,
            self.members.get(node_id, -1),
            direction,
            phase_of(msg.metadata.message_type),
            wire.message_bytes(msg),
        )
