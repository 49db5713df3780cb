"""Evaluation of members, their output ensemble and soups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wash_fed.data import ImageData

__all__ = ["PopulationAccuracy", "accuracy", "evaluate_population", "predict"]


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
    ensemble: float
    """Accuracy of the mean of the members' softmax outputs."""

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
