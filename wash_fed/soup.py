"""Model soups: weight averages of the members of a population.

A *soup* is a state dict. Floating-point entries are averaged; integer entries (BatchNorm's
``num_batches_tracked``) are taken from the first ingredient, since averaged weights do not
come with meaningful averaged statistics anyway (see :mod:`wash_fed.batchnorm`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GreedySoup", "greedy_soup", "uniform_soup"]

StateDict = Mapping[str, Tensor]


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, Tensor]:
    """The mean of ``state_dicts`` entry by entry.

    Every state dict must have the same keys and, per key, the same shape. Averaging is done
    in float64 and cast back, so the result does not depend on the order of the ingredients
    beyond rounding of the final cast.
    """
    if not state_dicts:
        raise ValueError("a soup needs at least one ingredient")
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if sd.keys() != first.keys():
            diff = sorted(set(sd) ^ set(first))
            raise ValueError(f"ingredient {i} has different entries than ingredient 0: {diff[:5]}")
        for key, value in sd.items():
            if value.shape != first[key].shape:
                raise ValueError(
                    f"ingredient {i}: {key!r} has shape {tuple(value.shape)}, "
                    f"ingredient 0 has {tuple(first[key].shape)}"
                )
    soup: dict[str, Tensor] = {}
    for key, value in first.items():
        if value.is_floating_point():
            stacked = torch.stack([sd[key].detach().to(torch.float64) for sd in state_dicts])
            soup[key] = stacked.mean(0).to(value.dtype)
        else:
            soup[key] = value.detach().clone()
    return soup


@dataclass(frozen=True)
class GreedySoup:
    """The result of :func:`greedy_soup`."""

    state_dict: dict[str, Tensor]
    ingredients: list[int]
    """Indices of the members in the soup, in the order they were added."""
    score: float
    """The soup's score (held-out accuracy)."""
    member_scores: list[float]


def greedy_soup(
    state_dicts: Sequence[StateDict], score: Callable[[StateDict], float]
) -> GreedySoup:
    """Wortsman et al.'s greedy soup.

    Members are sorted by ``score`` (higher is better, e.g. held-out accuracy); starting from
    the best one, each next member is kept only if the uniform soup of the kept members
    with it scores at least as well as without it.
    """
    member_scores = [score(sd) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -member_scores[i])
    kept = [order[0]]
    best_soup = uniform_soup([state_dicts[order[0]]])
    best = member_scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([state_dicts[j] for j in [*kept, i]])
        value = score(candidate)
        if value >= best:
            kept, best_soup, best = [*kept, i], candidate, value
    return GreedySoup(best_soup, kept, best, member_scores)
