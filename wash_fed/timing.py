"""Where a round's wall time goes: the members' compute, waiting for a slot, Flower's
delivery, transfer, and the server.

A round ends with the last reply, so its time is that of its *critical* member -- the one
whose reply arrived last -- plus the server's own work. The server measures, for each
member, the time from pushing its message to pulling its reply (*in flight*); what is in
flight but not the member's handling (*compute*: ``handler-seconds`` plus
``restore-seconds``) is the message's way there and its reply's way back. The member's
side of the ClientApp (:mod:`wash_fed.routing`) reports what it saw of that way:

- ``respond-seconds``: the ClientApp handling the message, of which what is not compute
  is relaying it (to the node's member worker, in deployments) -- Flower's delivery;
- ``startup-seconds``: the ClientApp's process starting, up to the handling, where Flower
  started it after the message was sent (deployments run one process per message, some
  started ahead of theirs) -- Flower's delivery;
- ``delivered-at`` and ``received-at``: when the SuperLink handed the message to the
  node (Flower's own stamp, which only simulation passes on to the ClientApp) and when the
  ClientApp began handling it, on one host's clock: in simulation the time between is
  the message waiting for a free backend slot (more members than slots).

In simulation no byte crosses a link, so the way there and back is the slot and Flower's
delivery (handing messages between the engine's queues, the server's polls). In a
deployment it is Flower's delivery as measured above, and *transfer*: the link both ways,
with Flower's polls that no process of the app can time -- Flower 1.42 tells no process
of a deployment's app when a node took a message (the SuperNode's wait, up to 3 s before
it looks for one; SuperExec's; the server's own, at most ``poll-interval``).
:mod:`wash_fed.time_model` predicts the link's and the polls' shares apart.
The parts add up to the round's time on the server's clock; only the slot compares two
clocks, those of one host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wash_fed.keys import Metric

__all__ = ["PARTS", "RoundTime", "StragglerWait", "split_round"]

PARTS = ("compute", "slot", "delivery", "transfer", "server")
"""The parts of a round's time, in the order of :class:`RoundTime`'s fields."""


@dataclass(frozen=True)
class RoundTime:
    """One round's wall time in parts (seconds, each >= 0, summing to the round's time)."""

    compute: float
    """The critical member's handling: restoring, applying the delivery, training, reading
    its reply, checkpointing."""
    slot: float
    """Its message waiting for a free slot of the simulation's backend."""
    delivery: float
    """Flower's delivery: its queues and polls, the ClientApp's process, the relay to the
    member worker."""
    transfer: float
    """The link both ways (deployments; with the polls no process of the app can time)."""
    server: float
    """Everything else: building messages, checking replies, the exchange, and waiting
    for members that never replied."""

    def as_dict(self) -> dict[str, float]:
        return {part: getattr(self, part) for part in PARTS}


def split_round(
    seconds: float,
    in_flight: Mapping[int, float],
    reported: Mapping[int, Mapping[str, object]],
    *,
    simulated: bool,
) -> RoundTime:
    """The parts of a round of ``seconds``.

    ``in_flight``: per member, seconds from pushing its message to pulling its reply.
    ``reported``: per member, the metrics of its accepted reply. ``simulated``: the run is
    Flower's simulation (no link: nothing is transfer). The critical member is the one
    with the longest time in flight among those that reported their handling; without
    one, the whole round is the server's. Parts are clipped so that none is negative and
    they sum to ``seconds`` exactly.
    """
    timed = {m: t for m, t in in_flight.items() if Metric.HANDLER_SECONDS in reported.get(m, {})}
    if not timed:
        return RoundTime(0.0, 0.0, 0.0, 0.0, max(seconds, 0.0))
    critical = max(timed, key=timed.__getitem__)
    figures = reported[critical]
    remaining = max(seconds, 0.0)
    flight = min(timed[critical], remaining)
    handling = _seconds(figures, Metric.HANDLER_SECONDS, Metric.RESTORE_SECONDS)
    compute = min(handling, flight)
    way = flight - compute
    if simulated:
        stamped = Metric.DELIVERED_AT in figures and Metric.RECEIVED_AT in figures
        queued = _seconds(figures, Metric.RECEIVED_AT) - _seconds(figures, Metric.DELIVERED_AT)
        slot = _within(queued, way) if stamped else 0.0
        return RoundTime(compute, slot, way - slot, 0.0, remaining - flight)
    relay = max(_seconds(figures, Metric.RESPOND_SECONDS) - handling, 0.0)
    delivery = _within(_seconds(figures, Metric.STARTUP_SECONDS) + relay, way)
    return RoundTime(compute, 0.0, delivery, way - delivery, remaining - flight)


def _within(value: float, limit: float) -> float:
    return max(min(value, limit), 0.0)


def _seconds(figures: Mapping[str, object], *keys: str) -> float:
    """The sum of ``figures[key]`` over ``keys``, each a number >= 0 (0 where it is not)."""
    total = 0.0
    for key in keys:
        value = figures.get(key, 0.0)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            total += max(float(value), 0.0)
    return total


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
