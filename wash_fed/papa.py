"""PAPA (Jolicoeur-Martineau et al., 2023): pull every member toward the population mean.

Every ``T`` rounds each member moves toward the mean of all members,
``theta <- rate * theta + (1 - rate) * mean``; ``rate = 0`` replaces every member by the
mean (the ``papa-all`` / DART-style variant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["population_mean", "pull_toward"]


def population_mean(members: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Tensor-wise mean over members: ``members[i][l]`` -> ``mean[l]`` (same shape and dtype)."""
    if not members:
        raise ValueError("the mean of an empty population is undefined")
    return [
        torch.stack([m[l].detach().double() for m in members]).mean(0).to(members[0][l].dtype)
        for l in range(len(members[0]))
    ]


@torch.no_grad()
def pull_toward(tensors: Sequence[Tensor], target: Sequence[Tensor], rate: float) -> None:
    """In place: ``t <- rate * t + (1 - rate) * target`` for aligned tensors; ``rate`` in [0, 1]."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if len(tensors) != len(target):
        raise ValueError(f"got {len(tensors)} tensors but {len(target)} targets")
    for t, m in zip(tensors, target, strict=True):
        if t.shape != m.shape:
            raise ValueError(f"shape {tuple(t.shape)} does not match target {tuple(m.shape)}")
        t.mul_(rate).add_(m.to(t.device, t.dtype), alpha=1.0 - rate)
