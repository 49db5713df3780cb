"""Evaluation of members, their output ensemble and soups.

Where the labelled data live is the caller's business: an :class:`Evaluator` judges models
given as state dicts, on data held in this process (:class:`OnData`, which builds the
model) or, in a Flower run without a server-side test set, on the members' own data
(``wash_fed.strategy.final``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


StateDict = Mapping[str, Tensor]


class Evaluator(Protocol):
    """Test accuracy of models given as state dicts, wherever the test data are."""

    def population(self, members: Sequence[StateDict]) -> PopulationAccuracy:
        """Each member's accuracy and, where it can be computed, the output ensemble's."""
        ...

    def accuracy(self, state_dict: StateDict) -> float: ...


@dataclass(frozen=True)
class OnData:
    """An :class:`Evaluator` over labelled data held in this process, for models that
    ``new_model()`` builds (on the device to use)."""

    data: ImageData
    batch_size: int
    new_model: Callable[[], nn.Module]

    def population(self, members: Sequence[StateDict]) -> PopulationAccuracy:
        return evaluate_population([self._model(m) for m in members], self.data, self.batch_size)

    def accuracy(self, state_dict: StateDict) -> float:
        return accuracy(
            predict(self._model(state_dict), self.data, self.batch_size), self.data.labels
        )

    def _model(self, state_dict: StateDict) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(state_dict)
        return model
