"""How long a run takes, predicted from what it is made of, in the parts of
:mod:`wash_fed.timing` (compute, slot, delivery, transfer, server).

A message round of ``N`` members -- a training round, the hello, one of the final step's --
lasts as long as its slowest member's way, plus the server's own work::

    round = compute + slot + delivery(N) + transfer + server

- ``compute``: a member's handling of the message (measured: a run's ``compute`` part);
- ``slot`` (simulation): members run ``slots`` at a time, so the last of them waits
  ``(ceil(N / slots) - 1) * compute`` for a free slot; 0 in a deployment;
- ``delivery(N) = fixed + per_byte * (down + up) + poll * N / (N + 1)``: Flower's own cost
  of a message and its reply, a fixed part, its handling of the bytes (serializing, storing,
  handing them on), and the wait for the SuperNode's next look for messages, uniform in
  ``[0, poll]`` for each member, of which the round waits for the longest (the expected
  maximum of ``N`` such waits); calibrated on Flower's floor app, a ClientApp that answers
  at once (:func:`Delivery.calibrated`), plus what an app's own ClientApp adds to each
  message round and each byte (``benchmarks/time_model.py`` measures both on a fast link);
- ``transfer = (down + up) * 8 / rate + 2 * latency``: each member's bytes on its own link
  (every member's link carries its own at once); 0 in simulation;
- ``server``: the server's own seconds (building messages, the gate, the exchange).

A run is its message rounds one after the other (:func:`run_seconds`). Nothing here imports
Flower or torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from wash_fed.timing import RoundTime

__all__ = [
    "FLOWER_POLL",
    "Delivery",
    "Link",
    "MessageRound",
    "Setting",
    "round_time",
    "run_seconds",
]

FLOWER_POLL = 3.0
"""Seconds a Flower 1.42 SuperNode waits before it looks again for messages, when it found
none (hard-coded in Flower)."""


@dataclass(frozen=True)
class Link:
    """Each member's link to the server: ``mbit`` Mbit/s each way (> 0; ``math.inf``: no
    limit), ``latency`` seconds one way (>= 0)."""

    mbit: float
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not self.mbit > 0 or not self.latency >= 0:
            raise ValueError(f"a link needs mbit > 0 and latency >= 0, not {self}")

    def seconds(self, down: float, up: float) -> float:
        """Moving ``down`` bytes to a member and ``up`` bytes back."""
        return 2 * self.latency + (down + up) * 8 / (self.mbit * 1e6)


@dataclass(frozen=True)
class Delivery:
    """Flower's cost of one message and its reply: ``fixed`` seconds, ``per_byte`` seconds
    for each byte it carries (serializing, storing and handing it on, beyond the link's
    time), and the wait for the node's next poll, uniform in ``[0, poll]`` (0: the node
    takes messages at once, as Flower's simulation does)."""

    fixed: float
    poll: float = FLOWER_POLL
    per_byte: float = 0.0

    def seconds(self, members: int, nbytes: float = 0.0) -> float:
        """A round's delivery with ``members`` members and ``nbytes`` bytes each way and
        back per member: the fixed part, the bytes' handling, and the longest of their
        waits for a poll (its expectation, ``poll * N / (N + 1)``)."""
        return self.fixed + self.per_byte * nbytes + self.poll * members / (members + 1)

    @classmethod
    def calibrated(cls, floor_round: float, members: int, poll: float = FLOWER_POLL) -> Delivery:
        """The delivery whose round of ``members`` lasts ``floor_round`` seconds: the
        floor app's mean round, all of which is Flower's (its fixed part at least 0)."""
        return cls(max(floor_round - poll * members / (members + 1), 0.0), poll)


@dataclass(frozen=True)
class MessageRound:
    """What one message round is made of, per member: ``down`` bytes to it, ``up`` bytes
    from it, ``compute`` seconds of its handling; and the ``server``'s own seconds."""

    down: float
    up: float
    compute: float
    server: float = 0.0


@dataclass(frozen=True)
class Setting:
    """Where a run happens: ``members`` members, each behind ``link`` (None: Flower's
    simulation, no link), delivered as ``delivery`` says; in simulation ``slots`` members
    at a time (None: all at once)."""

    members: int
    delivery: Delivery
    link: Link | None = None
    slots: int | None = None

    def __post_init__(self) -> None:
        if self.members < 1 or (self.slots is not None and self.slots < 1):
            raise ValueError(f"a setting needs members >= 1 and slots >= 1, not {self}")


def round_time(message_round: MessageRound, setting: Setting) -> RoundTime:
    """The predicted parts of ``message_round`` in ``setting`` (their sum: its seconds)."""
    compute = message_round.compute
    waves = 1 if setting.slots is None else math.ceil(setting.members / setting.slots)
    link = setting.link
    transfer = 0.0 if link is None else link.seconds(message_round.down, message_round.up)
    return RoundTime(
        compute=compute,
        slot=(waves - 1) * compute,
        delivery=setting.delivery.seconds(setting.members, message_round.down + message_round.up),
        transfer=transfer,
        server=message_round.server,
    )


def run_seconds(rounds: Sequence[MessageRound], setting: Setting) -> float:
    """A run of ``rounds``, one after the other, in ``setting``."""
    return math.fsum(sum(round_time(r, setting).as_dict().values()) for r in rounds)
