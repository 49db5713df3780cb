"""The members' replies to one exchange, gathered and checked for form: the first stage of
the reply gate for every message the server sends (training rounds, the final collection,
BatchNorm statistics, evaluations, FedAvg's rounds).

A reply is known by the member the server's roster has for the node that sent it, never by
what the reply says: one from a node that holds no member is ignored, and one whose
``partition-id`` metric names another member is rejected. What passes here still has its
values judged by the reply gate's pipeline (:meth:`wash_fed.gate.ReplyGate.admit`, the
ServerApp's own from :func:`reply_gate`), which also logs every rejection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from torch import Tensor

from wash_fed import wire
from wash_fed.config import GateConfig
from wash_fed.gate import Admission, ReplyGate
from wash_fed.keys import Metric

__all__ = ["Replies", "gather", "reply_gate"]


@dataclass
class Replies:
    """One exchange's replies, by partition id (in order)."""

    accepted: dict[int, wire.ReplyParts] = field(default_factory=dict)
    """Replies of the right form, with metrics the protocol knows, in range."""
    rejected: dict[int, str] = field(default_factory=dict)
    """Replies that are not: why."""
    failed: dict[int, str] = field(default_factory=dict)
    """Members that sent no reply, or an error: why."""
    errored: set[int] = field(default_factory=set)
    """The failures that were the member's own errors (:func:`wire.is_member_error`)."""
    messages: dict[int, Message] = field(default_factory=dict)
    """The accepted replies themselves (FedAvg hands them to Flower's aggregation)."""

    def answered(self) -> list[int]:
        """Members that sent a reply that was not an error (accepted or rejected)."""
        return sorted(self.accepted.keys() | self.rejected.keys())

    def admitted(self, admission: Admission[wire.ReplyParts]) -> None:
        """Keep what the reply gate admitted of :attr:`accepted`; the rest is rejected."""
        for partition, reason in admission.rejected.items():
            self.accepted.pop(partition, None)
            self.messages.pop(partition, None)
            self.rejected.setdefault(partition, reason)


def gather(
    replies: Iterable[Message],
    members: Mapping[int, int],
    arrays: str | None,
    what: str,
    read: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None,
) -> Replies:
    """Sort ``replies`` by member (``members``: partition id -> node id) and check each
    one's form: exactly a metrics record and, when ``arrays`` names one, that array record,
    its tensors decoded by ``read`` from the form they travel in (a ValueError: rejected);
    metrics finite and in range, and its ``partition-id`` (if any) its own. Members that
    did not answer are failed. Each failure is logged once, naming ``what`` was asked.
    """
    partition_of = {node: partition for partition, node in members.items()}
    got = Replies()
    for reply in replies:
        partition = partition_of.get(reply.metadata.src_node_id)
        if partition is None:
            continue
        if reply.has_error():
            got.failed[partition] = wire.error_reason(reply)
            if wire.is_member_error(reply):
                got.errored.add(partition)
            continue
        try:
            parts = wire.reply_parts(reply.content, arrays)
            problem = _identity_problem(parts, partition)
            if problem is None and read is not None:
                parts = replace(parts, tensors=read(parts.tensors))
        except (wire.MalformedReplyError, ValueError) as err:
            problem = str(err)
        if problem is None:
            got.accepted[partition], got.messages[partition] = parts, reply
        else:
            got.rejected[partition] = problem
    answered = got.accepted.keys() | got.rejected.keys() | got.failed.keys()
    for partition in members:
        if partition not in answered:
            got.failed[partition] = "no reply in time (round-timeout, or the stragglers' wait)"
    for partition, reason in sorted(got.failed.items()):
        log(
            WARNING,
            "member %d (node %d) failed %s: %s",
            partition,
            members[partition],
            what,
            reason,
        )
    got.accepted = dict(sorted(got.accepted.items()))
    got.messages = dict(sorted(got.messages.items()))
    return got


def _identity_problem(parts: wire.ReplyParts, partition: int) -> str | None:
    claimed = parts.metrics.get(Metric.PARTITION_ID, partition)
    if claimed != partition:
        return f"it reports partition-id {claimed}, but its node holds member {partition}"
    return None


def reply_gate(cfg: GateConfig) -> ReplyGate:
    """The run's reply gate, its lines in the ServerApp's log."""
    return ReplyGate(cfg.outlier_factor, lambda line: log(WARNING, "%s", line))
