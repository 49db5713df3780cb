"""One member's local training, and the data every member derives from the configuration.

A :class:`Member` owns a model, its SGD optimizer, its learning-rate schedule and its
position in its own data order. Everything it needs to continue elsewhere is in
:meth:`Member.state_dict` and :meth:`Member.loop_state`, so a Flower client can keep it in
``context.state`` between rounds and the population trainer can hold several in one process.
Given the same configuration and member index, two processes build the same member bit for
bit.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, OneCycleLR

from wash_fed.batchnorm import BNStatistics, bn_statistics
from wash_fed.config import WashFedConfig
from wash_fed.data import (
    IMAGES,
    BatchStream,
    DatasetNotFoundError,
    ImageData,
    load_local,
    load_split,
    partition_indices,
)
from wash_fed.member import PopulationMember
from wash_fed.models import build_model

__all__ = [
    "INIT_STREAM",
    "Member",
    "MemberData",
    "TrainStats",
    "TrainingData",
    "configure_torch",
    "derive_seed",
    "initial_model",
    "load_test_data",
    "load_training_data",
    "local_member_data",
    "new_model",
    "resolve_device",
    "shared_member_data",
]

# Stream tags for derive_seed, so that the seeds of different uses never collide.
INIT_STREAM, _DATA_ORDER, _HOLDOUT, _PARTITION = 1, 2, 3, 4


def derive_seed(*key: int) -> int:
    """A 63-bit seed determined by ``key`` (e.g. ``(run seed, purpose, member)``)."""
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def configure_torch(cfg: WashFedConfig) -> None:
    """Process-wide torch settings a run asks for. ``deterministic``: one thread and
    deterministic algorithms, so that two processes given the same inputs compute the same
    bits (the federated run then equals the population trainer's)."""
    if cfg.model.deterministic:
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
    """The shared data set as the run splits it, identical in every process of a run.

    ``partitions[i]`` indexes member ``i``'s examples in ``train``; ``holdout`` is disjoint
    from every partition (to pick greedy-soup ingredients), ``None`` if empty; member ``i``
    holds every ``num-members``-th image of it.
    """

    train: ImageData
    partitions: list[np.ndarray]
    holdout: ImageData | None

    def member(self, index: int) -> ImageData:
        """Member ``index``'s training examples (``train`` itself when it gets them all)."""
        part = self.partitions[index]
        if len(part) == len(self.train) and np.array_equal(part, np.arange(len(part))):
            return self.train
        return self.train.subset(part)

    def member_holdout(self, index: int) -> ImageData | None:
        """Member ``index``'s share of the held-out images; the shares partition them."""
        if self.holdout is None:
            return None
        shares = len(self.partitions)
        return self.holdout.subset(np.arange(index, len(self.holdout), shares))


def _task_images(cfg: WashFedConfig, path: str, key: str) -> ImageData:
    """``dataset='images'``: the images at ``path`` (the value of ``key``)."""
    if not path:
        raise DatasetNotFoundError(
            f"dataset='images' needs {key}: the images to load here (or each node's own "
            "data-path and test-data-path, with test-on-server=false)"
        )
    return load_local(path, cfg.data.task)


def _run_images(cfg: WashFedConfig, *, train: bool) -> ImageData:
    """The run's training (or test) images: the task's own files or the named data set's
    split, cut to ``train-subset`` (``test-subset``) when set."""
    data = cfg.data
    if data.dataset == IMAGES:
        path, key = (data.train_path, "train-path") if train else (data.test_path, "test-path")
        images = _task_images(cfg, path, key)
    else:
        images = load_split(data.dataset, data.data_root or None, train=train)
    subset = data.train_subset if train else data.test_subset
    return images.subset(np.arange(min(subset, len(images)))) if subset else images


def load_training_data(cfg: WashFedConfig) -> TrainingData:
    full = _run_images(cfg, train=True)
    if cfg.data.holdout_size >= len(full):
        raise ValueError(
            f"holdout-size={cfg.data.holdout_size} leaves no training data out of "
            f"{len(full)} images"
        )
    rng = np.random.Generator(np.random.Philox(derive_seed(cfg.seed, _HOLDOUT)))
    order = rng.permutation(len(full))
    holdout_idx, train_idx = (
        np.sort(order[: cfg.data.holdout_size]),
        np.sort(order[cfg.data.holdout_size :]),
    )
    train = full.subset(train_idx)
    partitions = partition_indices(
        train.labels,
        cfg.num_members,
        cfg.data.partition,  # type: ignore[arg-type]  # validated by WashFedConfig
        alpha=cfg.data.dirichlet_alpha,
        seed=derive_seed(cfg.seed, _PARTITION) % 2**32,
    )
    for i, part in enumerate(partitions):
        _check_enough(f"member {i} gets", len(part), cfg)
    holdout = full.subset(holdout_idx) if cfg.data.holdout_size else None
    return TrainingData(train, partitions, holdout)


def _check_enough(who: str, examples: int, cfg: WashFedConfig) -> None:
    if examples < cfg.optim.batch_size:
        raise ValueError(
            f"{who} {examples} training images, fewer than batch-size={cfg.optim.batch_size}; use "
            "more data, fewer members or another partition"
        )


def load_test_data(cfg: WashFedConfig) -> ImageData:
    return _run_images(cfg, train=False)


@dataclass(frozen=True)
class MemberData:
    """What one member trains on, picks soup ingredients on, and is tested on."""

    train: ImageData
    holdout: ImageData | None
    """Its held-out images for the greedy soup (``None``: none)."""
    test: ImageData | None
    """Its test images (``None``: it evaluates nothing)."""


def shared_member_data(cfg: WashFedConfig, index: int, data: TrainingData) -> MemberData:
    """Member ``index``'s part of the shared data set (``partition``), and its test set."""
    has_test = cfg.data.dataset != IMAGES or bool(cfg.data.test_path)
    test = load_test_data(cfg) if has_test else None
    return MemberData(data.member(index), data.member_holdout(index), test)


def local_member_data(
    cfg: WashFedConfig, index: int, data_path: str, test_path: str | None
) -> MemberData:
    """A node's own data (:func:`wash_fed.data.load_local`): ``train-subset`` applies, and
    ``holdout-size / num-members`` of its images are held out for the greedy soup."""
    own = load_local(data_path, cfg.data.task)
    if cfg.data.train_subset:
        own = own.subset(np.arange(min(cfg.data.train_subset, len(own))))
    share = -(-cfg.data.holdout_size // cfg.num_members)  # ceil
    rng = np.random.Generator(np.random.Philox(derive_seed(cfg.seed, _HOLDOUT, index)))
    order = rng.permutation(len(own))
    holdout = own.subset(np.sort(order[:share])) if share else None
    train = own.subset(np.sort(order[share:]))
    _check_enough(f"the node's data {data_path} leaves", len(train), cfg)
    test = load_local(test_path, cfg.data.task) if test_path else None
    return MemberData(train, holdout, test)


def new_model(cfg: WashFedConfig) -> nn.Module:
    """A model of the configured architecture for the data set's images and classes."""
    spec = cfg.data.task
    return build_model(cfg.model.name, spec.num_classes, spec.channels, spec.image_size)


def initial_model(cfg: WashFedConfig, member: int) -> nn.Module:
    """Member ``member``'s initial model: drawn from its own seed (``init='different'``) or
    from the run's (``'shared'``); the global torch RNG is left alone."""
    key = (cfg.seed, INIT_STREAM) if cfg.model.init == "shared" else (cfg.seed, INIT_STREAM, member)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*key))
        return new_model(cfg)


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
    if cfg.optim.lr_schedule == "one-cycle":
        return OneCycleLR(optimizer, max_lr=cfg.optim.lr, total_steps=cfg.total_steps)
    if cfg.optim.lr_schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=cfg.total_steps)
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


class LoopState(TypedDict):
    """The built-in training loop's own state (:meth:`Member.loop_state`): the learning-rate
    schedule, where the member's data order stands, the steps taken."""

    scheduler: dict[str, object]
    epoch: int
    cursor: int
    steps_done: int


class Member(PopulationMember):
    """Member ``index`` of the population described by ``cfg``, training on ``data`` (its own
    examples) with SGD, its learning-rate schedule and its own data order: the built-in
    image classifier's training loop on the member protocol's
    :class:`~wash_fed.member.PopulationMember`.

    Initialisation: ``init='different'`` draws each member's weights from its own seed,
    ``'shared'`` gives every member the same weights. Each member reads its data in its own
    order.
    """

    optimizer: torch.optim.SGD

    def __init__(
        self, cfg: WashFedConfig, index: int, data: ImageData, device: torch.device
    ) -> None:
        if cfg.optim.batch_size > len(data):
            raise ValueError(
                f"batch-size={cfg.optim.batch_size} is more than member {index}'s {len(data)} "
                "training images"
            )
        model = initial_model(cfg, index).to(device)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        super().__init__(cfg.member_settings, index, model, device, optimizer)
        self.cfg = cfg
        self.train_data = data.to(device)
        self.scheduler = _scheduler(cfg, self.optimizer)
        self.stream = BatchStream(
            np.arange(len(data)),
            cfg.optim.batch_size,
            seed=derive_seed(cfg.seed, _DATA_ORDER, index),
        )
        self.steps_done = 0

    def bn_statistics(self, state_dict: Mapping[str, Tensor]) -> BNStatistics:
        """BatchNorm statistics of the model ``state_dict`` (a soup) on
        :meth:`bn_inputs` (``bn-batches`` of them)."""
        probe = copy.deepcopy(self.model)
        probe.load_state_dict(state_dict)
        return bn_statistics(probe, self.bn_inputs(self.cfg.final.bn_batches))

    def bn_inputs(self, batches: int) -> Iterator[Tensor]:
        """The first ``batches`` input batches of this member's data, in stored order."""
        size = self.cfg.optim.batch_size
        own = self.train_data.subset(self.stream.indices[: batches * size])
        return (x for x, _ in own.batches(size))

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
        examples = steps * self.cfg.optim.batch_size
        return TrainStats(
            loss=mean_loss,
            accuracy=int(correct) / examples,
            examples=examples,
            steps=steps,
            epochs=self.stream.epochs_done,
        )

    def loop_state(self) -> LoopState:
        """The training loop's state beside the member's own (:meth:`state_dict`): what,
        with it, lets the member continue in another process."""
        epoch, cursor = self.stream.position()
        return {
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "cursor": cursor,
            "steps_done": self.steps_done,
        }

    def load_loop_state(self, state: LoopState) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.seek(state["epoch"], state["cursor"])
        self.steps_done = int(state["steps_done"])
