"""The population strategy on Flower's Grid: :class:`Wash` (WASH, PAPA, independent
members), the roster of members, the rounds, the ledger-keeping Grid, the final step, and
the run's record (its folder and Prometheus metrics)."""

from wash_fed.strategy.final import FinalModel, ServerEvaluation
from wash_fed.strategy.record import RunRecord
from wash_fed.strategy.state import RoundReport
from wash_fed.strategy.wash import ByFunction, Continuation, Wash

__all__ = [
    "ByFunction",
    "Continuation",
    "FinalModel",
    "RoundReport",
    "RunRecord",
    "ServerEvaluation",
    "Wash",
]
