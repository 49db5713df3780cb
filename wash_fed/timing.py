"""Where a round's wall time goes: the member's training, the rest of its handling, the
messages' way there and back, and the server.

A round ends with the last reply, so its time is that of its *critical* member -- the one
whose reply arrived last -- plus the server's own work. The server measures, for each
member, the time from pushing its message to pulling its reply (*in flight*); the member
reports how long it spent handling the message (``handler-seconds``, of which
``train-seconds`` training, plus ``restore-seconds`` rebuilding itself first). What is in
flight but not in the member's hands is *transfer*: the link both ways, Flower's queues and
polling, and starting the ClientApp. The four parts add up to the round's time, measured
on the server's clock only (member durations are differences on the member's own clock),
so no clocks need to agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wash_fed.keys import Metric

__all__ = ["PARTS", "RoundTime", "StragglerWait", "split_round"]

PARTS = ("train", "member", "transfer", "server")
"""The parts of a round's time, in the order of :class:`RoundTime`'s fields."""


@dataclass(frozen=True)
class RoundTime:
    """One round's wall time in parts (seconds, each >= 0, summing to the round's time)."""

    train: float
    """The critical member's training."""
    member: float
    """The rest of its handling: restoring, applying the delivery, reading its reply,
    checkpointing."""
    transfer: float
    """Its messages in flight minus its handling: the link both ways, Flower's queues and
    polling, the ClientApp's start."""
    server: float
    """Everything else: building messages, checking replies, the exchange, and waiting
    for members that never replied."""

    def as_dict(self) -> dict[str, float]:
        return {part: getattr(self, part) for part in PARTS}


def split_round(
    seconds: float,
    in_flight: Mapping[int, float],
    reported: Mapping[int, Mapping[str, object]],
) -> RoundTime:
    """The parts of a round of ``seconds``.

    ``in_flight``: per member, seconds from pushing its message to pulling its reply.
    ``reported``: per member, the metrics of its accepted reply. The critical member is the
    one with the longest time in flight among those that reported their handling; without
    one, the whole round is the server's. Parts are clipped so that none is negative and
    they sum to ``seconds`` exactly.
    """
    timed = {m: t for m, t in in_flight.items() if Metric.HANDLER_SECONDS in reported.get(m, {})}
    if not timed:
        return RoundTime(0.0, 0.0, 0.0, max(seconds, 0.0))
    critical = max(timed, key=timed.__getitem__)
    figures = reported[critical]
    handling = _seconds(figures, Metric.HANDLER_SECONDS) + _seconds(figures, Metric.RESTORE_SECONDS)
    remaining = max(seconds, 0.0)
    flight = min(timed[critical], remaining)
    handling = min(handling, flight)
    train = min(_seconds(figures, Metric.TRAIN_SECONDS), handling)
    return RoundTime(
        train=train,
        member=handling - train,
        transfer=flight - handling,
        server=remaining - flight,
    )


def _seconds(figures: Mapping[str, object], key: str) -> float:
    value = figures.get(key, 0.0)
    return max(float(value), 0.0) if isinstance(value, (int, float)) else 0.0


@dataclass(frozen=True)
class StragglerWait:
    """How long a training round waits for its last members once most have replied: a
    member whose link dropped, or whose machine stalls, costs the others a bounded wait
    instead of the whole ``round-timeout``.

    Once more than half of the round's members have replied, ``majority`` seconds after the
    messages went out, the round waits for the others until ``majority + max(min_wait,
    factor * majority)`` seconds (and never beyond ``round-timeout``). ``factor`` 0: no such
    limit. Members that reply later miss the round, as a member that never replied does,
    and take part again from the next."""

    factor: float
    min_wait: float

    def deadline(self, replied: int, expected: int, majority: float | None) -> float | None:
        """Seconds after the push at which the round stops waiting, given ``replied`` of
        ``expected`` replies in and the time ``majority`` at which more than half were
        (None before); None: no limit of its own (yet)."""
        if self.factor <= 0 or majority is None or 2 * replied <= expected:
            return None
        return majority + max(self.min_wait, self.factor * majority)
