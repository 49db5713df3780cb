"""The final step of a run: evaluate the members and their ensemble, build the soups,
recalibrate BatchNorm, evaluate the soups, and pick the final model.

Framework-free: where the test and held-out data and the BatchNorm statistics come from is
the caller's business (the population trainer has them in process, the Flower server may
ask the members), passed in as an evaluator and callables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from wash_fed.batchnorm import BNStatistics, with_bn_statistics
from wash_fed.evaluation import Evaluator
from wash_fed.results import FinalResult
from wash_fed.soup import greedy_soup, uniform_soup

__all__ = ["MergeResult", "merge_population"]

StateDict = Mapping[str, Tensor]


@dataclass
class MergeResult:
    """Test accuracies of everything the final step built, and the final model's weights."""

    members: list[float]
    ensemble: float | None
    """The output ensemble's accuracy (``None``: not evaluated, e.g. no server test set)."""
    soups: dict[str, float]
    """Test accuracy per soup: ``uniform``, ``uniform+bn``, ``greedy``, ``greedy+bn``."""
    final_soup: str
    """Which of :attr:`soups` is the final model."""
    final_state_dict: dict[str, Tensor]
    greedy_ingredients: dict[str, list[int]] = field(default_factory=dict)

    @property
    def member_mean(self) -> float:
        return sum(self.members) / len(self.members)

    def figures(self) -> FinalResult:
        """What ``results.json`` keeps of the merge (the final model's weights aside)."""
        return FinalResult(
            final_accuracy=self.soups[self.final_soup],
            final_model=self.final_soup,
            members=self.members,
            ensemble=self.ensemble,
            soups=self.soups,
            greedy_ingredients=self.greedy_ingredients,
        )


def merge_population(
    state_dicts: Sequence[StateDict],
    test: Evaluator,
    *,
    bn_statistics_of: Callable[[StateDict], BNStatistics] | None,
    holdout: Callable[[StateDict], float] | None,
    final_soup: str,
    as_sent: Callable[[StateDict], StateDict] = dict,
) -> MergeResult:
    """Evaluate and merge a trained population, given as its members' state dicts.

    ``test`` evaluates members, their ensemble and the soups. ``bn_statistics_of(soup)``
    returns BatchNorm statistics of the soup on training data; ``None`` skips recalibration.
    ``holdout(soup)`` (accuracy on held-out data) enables the greedy soup. ``final_soup`` is
    ``"uniform"`` or ``"greedy"``; the recalibrated variant is final when recalibration runs.
    ``as_sent(soup)`` is a soup as it travels to the members (rounded to ``final-dtype``):
    every soup is evaluated, recalibrated and saved as sent.
    """
    population = test.population(state_dicts)

    def prepared(soup: StateDict, recalibrate: bool) -> dict[str, Tensor]:
        sent = {k: v.detach().clone() for k, v in as_sent(soup).items()}
        if recalibrate and bn_statistics_of is not None:
            return with_bn_statistics(sent, bn_statistics_of(sent))
        return sent

    variants = [False, True] if bn_statistics_of is not None else [False]
    soups: dict[str, float] = {}
    finals: dict[str, dict[str, Tensor]] = {}
    ingredients: dict[str, list[int]] = {}
    uniform = uniform_soup(state_dicts)
    for recal in variants:
        name = "uniform+bn" if recal else "uniform"
        finals[name] = prepared(uniform, recal)
        soups[name] = test.accuracy(finals[name])
    if holdout is not None:
        for recal in variants:
            name = "greedy+bn" if recal else "greedy"

            def score(sd: StateDict, recal: bool = recal) -> float:
                return holdout(prepared(sd, recal))

            greedy = greedy_soup(state_dicts, score)
            ingredients[name] = greedy.ingredients
            finals[name] = prepared(greedy.state_dict, recal)
            soups[name] = test.accuracy(finals[name])
    final = final_soup + ("+bn" if bn_statistics_of is not None else "")
    if final not in finals:
        raise ValueError(f"soup {final_soup!r} was not built (greedy needs held-out data)")
    return MergeResult(
        members=population.members,
        ensemble=population.ensemble,
        soups=soups,
        final_soup=final,
        final_state_dict=finals[final],
        greedy_ingredients=ingredients,
    )
