"""BatchNorm recalibration: recompute a soup's running statistics on training data.

Averaged weights do not match averaged statistics, so a soup's BatchNorm layers need fresh
running means and variances. :func:`bn_statistics` computes them as the plain average over
batches (``momentum=None``); the statistics of several members' data are merged by
:func:`merge_bn_statistics`, weighted by batch count, which gives exactly what one process
would compute over all their batches. That is how the federated recalibration works: each
member computes statistics of the soup on its own data and the server merges them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "RUNNING_STATISTICS",
    "BNStatistics",
    "bn_layers_of",
    "bn_statistics",
    "is_running_statistic",
    "merge_bn_statistics",
    "running_statistics",
    "with_bn_statistics",
]


@dataclass(frozen=True)
class BNStatistics:
    """Running statistics of every BatchNorm layer, keyed by module name, over ``batches``."""

    means: dict[str, Tensor]
    variances: dict[str, Tensor]
    batches: int

    def named_tensors(self) -> dict[str, Tensor]:
        """Every statistic by ``<layer>.mean`` and ``<layer>.var`` (how they travel)."""
        tensors = {f"{name}.mean": t for name, t in self.means.items()}
        return tensors | {f"{name}.var": t for name, t in self.variances.items()}


def _bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


def _running(m: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
    """A layer's running mean, running variance and batch counter."""
    mean, var, tracked = m.running_mean, m.running_var, m.num_batches_tracked
    if mean is None or var is None or tracked is None:
        raise ValueError("BatchNorm layer without running statistics")
    return mean, var, tracked


@torch.no_grad()
def bn_statistics(model: nn.Module, inputs: Iterable[Tensor]) -> BNStatistics:
    """Statistics of ``model``'s BatchNorm layers over ``inputs`` (each a batch ``(b, ...)``).

    Computed on a copy, so ``model`` is left as it was. Every layer's statistic is the mean
    over batches of the batch mean (and of the unbiased batch variance), as BatchNorm's
    ``momentum=None`` defines it.
    """
    probe = copy.deepcopy(model).train()
    layers = _bn_layers(probe)
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None
    batches = 0
    for x in inputs:
        probe(x)
        batches += 1
    if layers and batches == 0:
        raise ValueError("BatchNorm statistics need at least one batch")
    running = {name: _running(m) for name, m in layers.items()}
    return BNStatistics(
        means={name: mean for name, (mean, _, _) in running.items()},
        variances={name: var for name, (_, var, _) in running.items()},
        batches=batches,
    )


def _weighted_mean(
    values: Sequence[dict[str, Tensor]], weights: Sequence[int]
) -> dict[str, Tensor]:
    total = sum(weights)
    return {
        name: (
            torch.stack([v[name].double() for v in values])
            .mul(torch.tensor(weights, dtype=torch.float64, device=values[0][name].device)[:, None])
            .sum(0)
            .div(total)
            .to(values[0][name].dtype)
        )
        for name in values[0]
    }


def merge_bn_statistics(parts: Sequence[BNStatistics]) -> BNStatistics:
    """Combine statistics computed on disjoint sets of batches, weighted by batch count."""
    parts = [p for p in parts if p.batches > 0]
    if not parts:
        raise ValueError("no BatchNorm statistics to merge")
    weights = [p.batches for p in parts]
    return BNStatistics(
        _weighted_mean([p.means for p in parts], weights),
        _weighted_mean([p.variances for p in parts], weights),
        sum(weights),
    )


def bn_layers_of(state_dict: Mapping[str, Tensor]) -> BNStatistics:
    """The BatchNorm running statistics a state dict holds, by layer (its ``<layer>.running_mean``
    and ``<layer>.running_var``; batches: 1): the reference for the layers and shapes
    statistics of this model must have, found without the model."""
    layers = sorted(
        k.removesuffix(".running_mean") for k in state_dict if k.endswith(".running_mean")
    )
    return BNStatistics(
        {name: state_dict[f"{name}.running_mean"].detach().clone() for name in layers},
        {name: state_dict[f"{name}.running_var"].detach().clone() for name in layers},
        1,
    )


RUNNING_STATISTICS = ("running_mean", "running_var")
"""What BatchNorm calls its running statistics in a state dict (``<layer>.<kind>``)."""


def is_running_statistic(name: str) -> bool:
    """Whether a state dict's ``name`` is a BatchNorm layer's running mean or variance."""
    return name.rpartition(".")[2] in RUNNING_STATISTICS


def running_statistics(state_dict: Mapping[str, Tensor]) -> frozenset[str]:
    """The names of the BatchNorm running means and variances in ``state_dict``: values
    measured on each member's own data, not trained (what the reply gate judges by
    distance only)."""
    layers = bn_layers_of(state_dict).means
    return frozenset(f"{name}.{kind}" for name in layers for kind in RUNNING_STATISTICS)


def with_bn_statistics(state_dict: Mapping[str, Tensor], stats: BNStatistics) -> dict[str, Tensor]:
    """``state_dict`` with ``stats`` as its BatchNorm layers' running statistics (and their
    batch counters at ``stats.batches``)."""
    layers = bn_layers_of(state_dict).means.keys()
    if set(layers) != set(stats.means):
        raise ValueError(
            f"statistics are for layers {sorted(stats.means)}, the model has {sorted(layers)}"
        )
    merged = {k: v.detach().clone() for k, v in state_dict.items()}
    for name in layers:
        mean, var = merged[f"{name}.running_mean"], merged[f"{name}.running_var"]
        merged[f"{name}.running_mean"] = stats.means[name].to(mean.dtype)
        merged[f"{name}.running_var"] = stats.variances[name].to(var.dtype)
        tracked = f"{name}.num_batches_tracked"
        if tracked in merged:
            merged[tracked] = torch.full_like(merged[tracked], stats.batches)
    return merged
