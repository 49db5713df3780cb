"""Evaluation of members, their output ensemble and soups.

Where the labelled data live is the caller's business: an :class:`Evaluator` answers for
data held in this process (:class:`OnData`) or, in a Flower run without a server-side test
set, for the members' own data (``server.final``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from wash_fed.data import ImageData

__all__ = [
    "Evaluator",
    "OnData",
    "PopulationAccuracy",
    "accuracy",
    "evaluate_population",
    "predict",
]


@torch.no_grad()
def predict(model: nn.Module, data: ImageData, batch_size: int) -> Tensor:
    """Softmax probabilities of ``model`` on ``data``: float32, shape ``(n, classes)``, CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = data.to(device)
    try:
        probs = [model(x).softmax(dim=1).cpu() for x, _ in data.batches(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(probs)


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``probs`` ``(n, classes)`` against ``labels`` ``(n,)``."""
    return float((probs.argmax(1) == labels.to(probs.device)).float().mean())


@dataclass(frozen=True)
class PopulationAccuracy:
    members: list[float]
    ensemble: float | None
    """Accuracy of the mean of the members' softmax outputs (``None``: not evaluated)."""

    @property
    def member_mean(self) -> float:
        return sum(self.members) / len(self.members)


def evaluate_population(
    models: Sequence[nn.Module], data: ImageData, batch_size: int
) -> PopulationAccuracy:
    """Each member's accuracy and the output ensemble's, from one pass per member."""
    probs = [predict(m, data, batch_size) for m in models]
    labels = data.labels.cpu()
    members = [accuracy(p, labels) for p in probs]
    ensemble = accuracy(torch.stack(probs).mean(0), labels)
    return PopulationAccuracy(members, ensemble)


class Evaluator(Protocol):
    """Test accuracy of models, wherever the test data are."""

    def population(self, models: Sequence[nn.Module]) -> PopulationAccuracy:
        """Each member's accuracy and, where it can be computed, the output ensemble's."""
        ...

    def accuracy(self, model: nn.Module) -> float: ...


@dataclass(frozen=True)
class OnData:
    """An :class:`Evaluator` over labelled data held in this process."""

    data: ImageData
    batch_size: int

    def population(self, models: Sequence[nn.Module]) -> PopulationAccuracy:
        return evaluate_population(models, self.data, self.batch_size)

    def accuracy(self, model: nn.Module) -> float:
        return accuracy(predict(model, self.data, self.batch_size), self.data.labels)
