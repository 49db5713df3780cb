"""The server's round state: what each round was, and what the population strategy carries
from round to round (deliveries due, members missing, quarantine, the rounds done).

The strategy owns one :class:`StrategyState`; the checkpoint (:mod:`server.checkpoint`)
saves it whole and a resumed run continues from it. Nothing here imports Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wash_fed.gate import Quarantine
from wash_fed.keys import Metric, Metrics
from wash_fed.protocol import Deliveries

__all__ = ["RoundReport", "StrategyState"]


@dataclass
class RoundReport:
    """One round as the server saw it."""

    round: int
    metrics: dict[int, Metrics]
    """Per partition id of a member whose reply was accepted: the metrics it reported."""
    failed: dict[int, str]
    """Per partition id of a member that did not answer properly: why."""
    seconds: float
    exchange: dict[str, int]
    """What the strategy moved (WASH: ``selected``, ``moved``, ``participants``)."""
    exchange_digest: str = ""
    """Fingerprint of the round's deliveries (:attr:`wash_fed.protocol.Exchange.digest`)."""
    rejected: dict[int, str] = field(default_factory=dict)
    """Per partition id of a member whose reply the gate rejected: why."""

    def member_means(self) -> dict[str, float]:
        """Each numeric metric averaged over the members that reported it (partition ids
        left out)."""
        rows = list(self.metrics.values())
        keys = {k for row in rows for k, v in row.items() if isinstance(v, (int, float))}
        keys.discard(Metric.PARTITION_ID)
        means = {}
        for key in sorted(keys):
            values = [float(r[key]) for r in rows if key in r]
            means[key] = sum(values) / len(values)
        return means


@dataclass
class StrategyState:
    """What the population strategy carries from one round to the next."""

    quarantine: Quarantine
    deliveries: Deliveries = field(default_factory=Deliveries)
    history: list[RoundReport] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)
    """Partition ids whose last message failed (looked for under a new node id)."""
    rounds_done: int = 0
    """Rounds of an earlier run this one continues; Flower's round r is round
    ``rounds_done + r`` of the run."""
    checkpointed: int = 0
    """The newest round of the server's checkpoint (members keep theirs from it on)."""

    def resumed_at(self, server_round: int) -> StrategyState:
        """This state, as a run continuing after ``server_round`` takes it up."""
        self.rounds_done = self.checkpointed = server_round
        return self

    def reasons(self) -> dict[int, str]:
        """Why members failed or were rejected, in the latest round that says (after
        quarantines, later rounds ask nobody)."""
        return next(
            ({**r.failed, **r.rejected} for r in reversed(self.history) if r.failed or r.rejected),
            {},
        )
