"""The population strategy on Flower's Grid: :class:`Wash` (WASH, PAPA, independent
members), the roster of members, the rounds, the ledger-keeping Grid and the final step."""

from wash_fed.strategy.final import FinalModel, ServerEvaluation
from wash_fed.strategy.state import RoundReport
from wash_fed.strategy.wash import ByFunction, Continuation, Wash

__all__ = ["ByFunction", "Continuation", "FinalModel", "RoundReport", "ServerEvaluation", "Wash"]
