"""One member's local training, and the data every member derives from the configuration.

A :class:`Member` owns a model, its SGD optimizer, its learning-rate schedule and its
position in its own data order. Everything it needs to continue elsewhere is in
:meth:`Member.state_dict`, so a Flower client can keep it in ``context.state`` between rounds
and the population trainer can hold several in one process. Given the same configuration
and member index, two processes build the same member bit for bit.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, OneCycleLR

from wash_fed.batchnorm import BNStatistics, bn_statistics
from wash_fed.config import WashFedConfig
from wash_fed.data import BatchStream, ImageData, load_split, partition_indices
from wash_fed.models import build_model
from wash_fed.shuffle import ShuffleMask, event_mask, layer_probs

__all__ = [
    "Member",
    "TrainStats",
    "TrainingData",
    "configure_torch",
    "derive_seed",
    "initial_model",
    "load_test_data",
    "load_training_data",
    "new_model",
    "resolve_device",
    "wash_mask",
]

# Stream tags for derive_seed, so that the seeds of different uses never collide.
_INIT, _DATA_ORDER, _HOLDOUT, _PARTITION = 1, 2, 3, 4


def derive_seed(*key: int) -> int:
    """A 63-bit seed determined by ``key`` (e.g. ``(run seed, purpose, member)``)."""
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def wash_mask(cfg: WashFedConfig, numels: Sequence[int], event: int) -> ShuffleMask:
    """The mask of shuffle event ``event`` for parameter tensors of ``numels`` scalars, with
    the configured shuffle probability, layer schedule and run seed."""
    probs = layer_probs(cfg.shuffle_prob, len(numels), cfg.layer_schedule)  # type: ignore[arg-type]
    return event_mask(numels, probs, seed=cfg.seed, event=event)


def configure_torch(cfg: WashFedConfig) -> None:
    """Process-wide torch settings a run asks for. ``deterministic``: one thread and
    deterministic algorithms, so that two processes given the same inputs compute the same
    bits (the federated run then equals the population trainer's)."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device='cuda' but torch sees no CUDA device; use device='auto' or 'cpu'"
        )
    return torch.device(name)


@dataclass(frozen=True)
class TrainingData:
    """The training images and how they are split, identical in every process of a run.

    ``partitions[i]`` indexes member ``i``'s examples in ``train``; ``holdout`` is disjoint
    from every partition (used to pick greedy-soup ingredients), ``None`` if empty.
    """

    train: ImageData
    partitions: list[np.ndarray]
    holdout: ImageData | None


def load_training_data(cfg: WashFedConfig) -> TrainingData:
    full = load_split(cfg.dataset, cfg.data_root or None, train=True)
    if cfg.train_subset:
        full = full.subset(np.arange(min(cfg.train_subset, len(full))))
    if cfg.holdout_size >= len(full):
        raise ValueError(
            f"holdout-size={cfg.holdout_size} leaves no training data out of {len(full)} images"
        )
    rng = np.random.Generator(np.random.Philox(derive_seed(cfg.seed, _HOLDOUT)))
    order = rng.permutation(len(full))
    holdout_idx, train_idx = np.sort(order[: cfg.holdout_size]), np.sort(order[cfg.holdout_size :])
    train = full.subset(train_idx)
    partitions = partition_indices(
        train.labels,
        cfg.num_members,
        cfg.partition,  # type: ignore[arg-type]  # validated by WashFedConfig
        alpha=cfg.dirichlet_alpha,
        seed=derive_seed(cfg.seed, _PARTITION) % 2**32,
    )
    for i, part in enumerate(partitions):
        if len(part) < cfg.batch_size:
            raise ValueError(
                f"member {i} gets {len(part)} training images, fewer than batch-size="
                f"{cfg.batch_size}; use a larger data set, fewer members or another partition"
            )
    holdout = full.subset(holdout_idx) if cfg.holdout_size else None
    return TrainingData(train, partitions, holdout)


def load_test_data(cfg: WashFedConfig) -> ImageData:
    test = load_split(cfg.dataset, cfg.data_root or None, train=False)
    if cfg.test_subset:
        test = test.subset(np.arange(min(cfg.test_subset, len(test))))
    return test


def new_model(cfg: WashFedConfig, data: ImageData) -> nn.Module:
    """A model of the configured architecture for ``data``'s images and classes."""
    size = (int(data.images.shape[2]), int(data.images.shape[3]))
    return build_model(cfg.model, data.num_classes, data.channels, size)


def initial_model(cfg: WashFedConfig, data: ImageData, member: int) -> nn.Module:
    """Member ``member``'s initial model: drawn from its own seed (``init='different'``) or
    from the run's (``'shared'``); the global torch RNG is left alone."""
    key = (cfg.seed, _INIT) if cfg.init == "shared" else (cfg.seed, _INIT, member)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*key))
        return new_model(cfg, data)


@dataclass(frozen=True)
class TrainStats:
    """What a member reports after some local steps."""

    loss: float
    """Mean training loss over the steps."""
    accuracy: float
    """Accuracy on the training batches, as they were seen (before each update)."""
    examples: int
    steps: int
    epochs: float
    """Epochs of its own data the member has completed, fractional."""


def _scheduler(cfg: WashFedConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    if cfg.lr_schedule == "one-cycle":
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.total_steps)
    if cfg.lr_schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=cfg.total_steps)
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


class Member:
    """Member ``index`` of the population described by ``cfg``.

    Initialisation: ``init='different'`` draws each member's weights from its own seed,
    ``'shared'`` gives every member the same weights. Each member reads its partition in its
    own order.
    """

    def __init__(
        self, cfg: WashFedConfig, index: int, data: TrainingData, device: torch.device
    ) -> None:
        if not 0 <= index < cfg.num_members:
            raise ValueError(f"member index {index} out of range for num-members={cfg.num_members}")
        self.cfg, self.index, self.device = cfg, index, device
        self.train_data = data.train.to(device)
        self.model = initial_model(cfg, data.train, index).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = _scheduler(cfg, self.optimizer)
        self.stream = BatchStream(
            data.partitions[index], cfg.batch_size, seed=derive_seed(cfg.seed, _DATA_ORDER, index)
        )
        self.steps_done = 0
        self.applied_event = 0
        """The newest delivery (the round whose exchange produced it) written into the member."""

    def parameters(self) -> list[Tensor]:
        """The trainable tensors, in registration order (the order layer schedules use)."""
        return list(self.model.parameters())

    def shuffle_groups(self, with_optimizer_state: bool) -> dict[str, list[Tensor]]:
        """The tensors a shuffle event moves, by kind, aligned with :meth:`parameters`.

        ``{"weights": [...]}``, plus each optimizer-state tensor kind that has the shape of
        its parameter (SGD: ``momentum_buffer``) when ``with_optimizer_state``. Missing state
        (a parameter not yet updated) is created as zeros so that every member sends the
        same kinds.
        """
        params = self.parameters()
        groups: dict[str, list[Tensor]] = {"weights": params}
        if with_optimizer_state:
            groups["momentum_buffer"] = [self._momentum_buffer(p) for p in params]
        return groups

    def _momentum_buffer(self, param: Tensor) -> Tensor:
        state = self.optimizer.state[param]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer: Tensor = state["momentum_buffer"]
        return buffer

    def shuffle_mask(self, event: int) -> ShuffleMask:
        """The WASH mask of shuffle event ``event`` over this member's parameters."""
        return wash_mask(self.cfg, [p.numel() for p in self.parameters()], event)

    def bn_statistics(self, state_dict: Mapping[str, Tensor]) -> BNStatistics:
        """BatchNorm statistics of the model ``state_dict`` (a soup) on the first
        ``bn-batches`` batches of this member's data, in stored order."""
        probe = copy.deepcopy(self.model)
        probe.load_state_dict(state_dict)
        own = self.train_data.subset(
            self.stream.indices[: self.cfg.bn_batches * self.cfg.batch_size]
        )
        return bn_statistics(probe, (x for x, _ in own.batches(self.cfg.batch_size)))

    def train_steps(self, steps: int) -> TrainStats:
        """Take ``steps`` SGD steps on the member's own batches."""
        if self.steps_done + steps > self.cfg.total_steps:
            raise RuntimeError(
                f"member {self.index} asked to go past its {self.cfg.total_steps} scheduled steps"
            )
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for _ in range(steps):
            x, y = self.train_data.batch(self.stream.next())
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
        self.steps_done += steps
        mean_loss = float(loss_sum) / steps
        if not np.isfinite(mean_loss):
            raise FloatingPointError(
                f"member {self.index}: training loss became {mean_loss} by step {self.steps_done}; "
                "lower lr"
            )
        examples = steps * self.cfg.batch_size
        return TrainStats(
            loss=mean_loss,
            accuracy=int(correct) / examples,
            examples=examples,
            steps=steps,
            epochs=self.stream.epochs_done,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, schedule, data position and the
        newest delivery applied."""
        epoch, cursor = self.stream.position()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stream": {"epoch": epoch, "cursor": cursor},
            "steps_done": self.steps_done,
            "applied_event": self.applied_event,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.seek(state["stream"]["epoch"], state["stream"]["cursor"])
        self.steps_done = int(state["steps_done"])
        self.applied_event = int(state["applied_event"])
