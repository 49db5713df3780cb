"""The run configuration: one typed, validated object for the Flower app and the population
trainer alike, in sections.

:class:`WashFedConfig` holds the run's shape (strategy, members, rounds, seed) and one
section per component: the task and its data (:class:`DataConfig`), the model
(:class:`ModelConfig`), optimisation (:class:`OptimConfig`), WASH and PAPA
(:class:`ExchangeConfig`), the reply gate (:class:`GateConfig`), the final step
(:class:`FinalConfig`), Flower's runtime (:class:`RuntimeConfig`) and the output
(:class:`OutputConfig`). Each section is a frozen dataclass that checks its own keys when
it is made; :class:`WashFedConfig` checks what involves two sections.

Keys are flat and spelled in kebab-case where users write them (``[tool.flwr.app.config]``,
``flwr run --run-config``, the population trainer's ``--options``, ``results.json``):
``cfg.optim.batch_size`` is ``batch-size``. :meth:`WashFedConfig.from_mapping` parses and
validates once; every problem is a :class:`ConfigError` that names the key and what is
allowed, raised before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from wash_fed.codec import FORMATS
from wash_fed.data import DATASETS, IMAGES, PARTITIONS, DatasetSpec
from wash_fed.models import model_problem
from wash_fed.shuffle import LAYER_SCHEDULES, ShuffleMask, wash_mask
from wash_fed.timing import StragglerWait

__all__ = [
    "SECTIONS",
    "STRATEGIES",
    "ConfigError",
    "ConfigValue",
    "DataConfig",
    "ExchangeConfig",
    "FinalConfig",
    "GateConfig",
    "MemberSettings",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "RuntimeConfig",
    "WashFedConfig",
    "toml_value",
]

ConfigValue = bool | int | float | str
"""A configuration value, as TOML, Flower's records and ``results.json`` hold it."""

Strategy = Literal["wash", "papa", "papa-all", "ensemble", "fedavg"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
STRATEGY_ALIASES = {"independent": "ensemble"}
LR_SCHEDULES = ("one-cycle", "cosine", "constant")
INITS = ("different", "shared")
SOUPS = ("uniform", "greedy")
DEVICES = ("auto", "cpu", "cuda")
WIRE_DTYPES = FORMATS
AUTO = "auto"
AUTO_WIRE_DTYPES: dict[str, str] = {"wash": "int4"}
"""What ``wire-dtype = "auto"`` is for each strategy that has one of its own; float16 for the
others. WASH's default run kept its soup above its members on three seeds in int4, for 31%
fewer bytes than float16; FedAvg over 30 rounds lost 1.6 points in int4
(docs/results/defaults.md, docs/results/frontier.md)."""
AUTO_WIRE_DTYPE = "float16"
WIRE_DTYPE_KEY = "wire-dtype"

RESUMABLE_CHANGES = frozenset(
    {
        "resume-from",
        "output-dir",
        "member-checkpoints",
        "min-members",
        "round-timeout",
        "straggler-factor",
        "straggler-min-wait",
        "poll-interval",
        "node-wait-timeout",
        "worker-idle-timeout",
        "metrics-port",
        "metrics-grace",
        "metrics-pushgateway",
        "save-members",
        "device",
    }
)
"""Keys a resumed run may set differently from the run it continues."""

MAX_TIMEOUT = 43_200.0
"""Seconds: Flower's default time to live of a message (12 h), the longest any wait may be."""
MAX_POLL_INTERVAL = 60.0
"""Seconds: the longest poll interval Flower itself accepts (its SuperExec's)."""


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _doc(text: str, key: str | None = None) -> dict[str, str]:
    """A field's help text, and its key where it is not the field's own name in kebab-case."""
    return {"help": text} | ({"key": key} if key else {})


def _listed(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _key(f: dataclasses.Field[Any]) -> str:
    key: str = f.metadata.get("key", f.name.replace("_", "-"))
    return key


class Section:
    """A section of the configuration: a frozen dataclass whose fields are keys; it checks
    every number is finite and fits Flower's records, then its own rules (:meth:`check`)."""

    title: ClassVar[str]
    """The section's heading in the configuration reference."""

    def __post_init__(self) -> None:
        _check_numbers(self)
        self.check()

    def check(self) -> None:
        """This section's own rules; ConfigError naming the key that breaks one."""


def _check_numbers(section: object) -> None:
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value, key = getattr(section, f.name), _key(f)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(
                f"{key} must fit in a signed 64-bit integer (as Flower's records hold "
                f"numbers), got {value}"
            )


@dataclass(frozen=True)
class DataConfig(Section):
    """The task and its data: which images, how they are split among the members, and
    what is held out."""

    title: ClassVar[str] = "Task and data"

    dataset: str = field(
        default="fashion-mnist",
        metadata=_doc(
            f"one of {_listed(sorted(DATASETS))}, or 'images': a task the keys below describe"
        ),
    )
    num_classes: int = field(default=0, metadata=_doc("dataset='images': the classes, >= 2"))
    channels: int = field(default=0, metadata=_doc("dataset='images': image channels, >= 1"))
    image_size: str = field(
        default="", metadata=_doc("dataset='images': 'HxW' (or 'N' for N x N) in pixels")
    )
    image_mean: str = field(
        default="",
        metadata=_doc(
            "dataset='images': per-channel mean on the [0, 1] scale, comma-separated; empty: "
            "each image set's own"
        ),
    )
    image_std: str = field(
        default="",
        metadata=_doc("dataset='images': per-channel standard deviation, as image-mean"),
    )
    train_path: str = field(
        default="",
        metadata=_doc(
            "dataset='images': training images (a tensor file or a class-folder tree) shared "
            "by the members that name no data-path of their own (simulation, the population "
            "trainer)"
        ),
    )
    test_path: str = field(
        default="",
        metadata=_doc("dataset='images': test images, for the server and for such members"),
    )
    data_root: str = field(
        default="", metadata=_doc("data directory; empty: $WASH_FED_DATA or ~/.cache/wash-fed/data")
    )
    partition: str = field(default="full", metadata=_doc(f"one of {_listed(PARTITIONS)}"))
    dirichlet_alpha: float = field(
        default=0.5, metadata=_doc("concentration for partition=dirichlet, > 0")
    )
    train_subset: int = field(default=0, metadata=_doc("use the first K training images; 0: all"))
    test_subset: int = field(
        default=0, metadata=_doc("evaluate on the first K test images; 0: all")
    )
    holdout_size: int = field(
        default=5000, metadata=_doc("training images held out for the greedy soup")
    )
    validation_path: str = field(
        default="",
        metadata=_doc(
            "Flower: the server picks greedy-soup ingredients on this file or image folder; "
            "empty: on the members' held-out images"
        ),
    )
    test_on_server: bool = field(
        default=True,
        metadata=_doc(
            "Flower: the server evaluates on its own copy of the test set; false: it needs "
            "no data, the members evaluate on their own test data"
        ),
    )

    def check(self) -> None:
        _one_of("dataset", self.dataset, (*sorted(DATASETS), IMAGES))
        self._check_task()
        _one_of("partition", self.partition, PARTITIONS)
        _greater("dirichlet-alpha", self.dirichlet_alpha, 0.0)
        _at_least("train-subset", self.train_subset, 0)
        _at_least("test-subset", self.test_subset, 0)
        _at_least("holdout-size", self.holdout_size, 0)

    def _check_task(self) -> None:
        """The keys of a task described by configuration: all set for ``images``, none for
        a named data set."""
        task_keys = (
            "num-classes", "channels", "image-size", "image-mean", "image-std", "train-path",
            "test-path",
        )  # fmt: skip
        if self.dataset != IMAGES:
            given = [k for k in task_keys if getattr(self, k.replace("-", "_"))]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} describe dataset='images'; {self.dataset} has its own"
                )
            return
        _at_least("num-classes", self.num_classes, 2)
        _at_least("channels", self.channels, 1)
        _pixels(self.image_size)
        mean, std = (
            _per_channel("image-mean", self.image_mean),
            _per_channel("image-std", self.image_std),
        )
        if bool(mean) != bool(std):
            raise ConfigError("image-mean and image-std go together: give both or neither")
        for key, values in (("image-mean", mean), ("image-std", std)):
            if values and len(values) != self.channels:
                raise ConfigError(f"{key} has {len(values)} values for channels={self.channels}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"image-std must be > 0 for every channel, got {self.image_std}")

    @property
    def task(self) -> DatasetSpec:
        """What the run trains on: the named data set's description, or the one the task's
        keys give (``dataset='images'``)."""
        if self.dataset != IMAGES:
            return DATASETS[self.dataset]
        return DatasetSpec(
            IMAGES,
            "",
            self.num_classes,
            self.channels,
            _pixels(self.image_size),
            _per_channel("image-mean", self.image_mean),
            _per_channel("image-std", self.image_std),
            "give train-path (or each node its data-path) and test-path",
        )


@dataclass(frozen=True)
class ModelConfig(Section):
    """The model, how the members start from it, and where it runs."""

    title: ClassVar[str] = "Model"

    name: str = field(
        default="cnn",
        metadata=_doc(
            "'cnn', 'cnn-wide', 'resnet18', 'torchvision:<name>' or 'module:factory'", key="model"
        ),
    )
    init: str = field(
        default="shared", metadata=_doc(f"one of {_listed(INITS)}: member initialisations")
    )
    device: str = field(
        default="auto", metadata=_doc(f"one of {_listed(DEVICES)}; auto: CUDA when available")
    )
    deterministic: bool = field(
        default=False,
        metadata=_doc("one thread and deterministic algorithms per member: bit-exact reruns"),
    )

    def check(self) -> None:
        if (problem := model_problem(self.name)) is not None:
            raise ConfigError(problem)
        _one_of("init", self.init, INITS)
        _one_of("device", self.device, DEVICES)


@dataclass(frozen=True)
class OptimConfig(Section):
    """Each member's optimisation: SGD steps per round, batches, the learning rate."""

    title: ClassVar[str] = "Optimisation"

    local_steps: int = field(default=50, metadata=_doc("optimizer steps per member per round"))
    batch_size: int = field(default=128, metadata=_doc("training batch size"))
    lr: float = field(default=0.05, metadata=_doc("peak learning rate (SGD)"))
    momentum: float = field(default=0.9, metadata=_doc("SGD momentum in [0, 1)"))
    weight_decay: float = field(default=5e-4, metadata=_doc("SGD weight decay, >= 0"))
    lr_schedule: str = field(default="one-cycle", metadata=_doc(f"one of {_listed(LR_SCHEDULES)}"))

    def check(self) -> None:
        _at_least("local-steps", self.local_steps, 1)
        _at_least("batch-size", self.batch_size, 1)
        _greater("lr", self.lr, 0.0)
        _in_range("momentum", self.momentum, 0.0, 1.0, closed_high=False)
        _at_least("weight-decay", self.weight_decay, 0.0)
        _one_of("lr-schedule", self.lr_schedule, LR_SCHEDULES)


@dataclass(frozen=True)
class ExchangeConfig(Section):
    """What the members exchange while they train: WASH's shuffle, PAPA's average, and the
    values' type on the wire."""

    title: ClassVar[str] = "WASH and PAPA"

    shuffle_prob: float = field(default=0.05, metadata=_doc("WASH shuffle probability p in [0, 1]"))
    layer_schedule: str = field(
        default="constant", metadata=_doc(f"one of {_listed(LAYER_SCHEDULES)}")
    )
    shuffle_optimizer_state: bool = field(
        default=False, metadata=_doc("WASH+Opt: move momentum with weights")
    )
    papa_every: int = field(default=1, metadata=_doc("PAPA: average every T rounds"))
    papa_rate: float = field(
        default=0.9, metadata=_doc("PAPA: theta <- rate*theta + (1-rate)*mean, in [0, 1)")
    )
    wire_dtype: str = field(
        default=AUTO,
        metadata=_doc(
            f"{AUTO!r} or one of {_listed(WIRE_DTYPES)}: the values exchanged while training "
            "(WASH's shuffled values, PAPA's weights and mean, FedAvg's models; auto: int4 for "
            "wash, float16 for the others and with optimizer state); the final step's is "
            "final-dtype"
        ),
    )

    def wire_dtype_for(self, strategy: str) -> str:
        """The values' type a run of ``strategy`` sends while training: ``wire-dtype``, or
        for ``auto`` the strategy's own (:data:`AUTO_WIRE_DTYPES`), float16 where optimizer
        state moves with the weights (Adam's second moments span orders of magnitude within
        a block of 4-bit codes; not measured)."""
        if self.wire_dtype != AUTO:
            return self.wire_dtype
        if self.shuffle_optimizer_state:
            return AUTO_WIRE_DTYPE
        return AUTO_WIRE_DTYPES.get(strategy, AUTO_WIRE_DTYPE)

    def check(self) -> None:
        _in_range("shuffle-prob", self.shuffle_prob, 0.0, 1.0)
        _one_of("layer-schedule", self.layer_schedule, LAYER_SCHEDULES)
        _at_least("papa-every", self.papa_every, 1)
        _in_range("papa-rate", self.papa_rate, 0.0, 1.0, closed_high=False)
        _one_of("wire-dtype", self.wire_dtype, (AUTO, *WIRE_DTYPES))


@dataclass(frozen=True)
class GateConfig(Section):
    """The reply gate: how far from the others a member's values may be, and how often it
    may be rejected before it is quarantined."""

    title: ClassVar[str] = "Reply gate"

    outlier_factor: float = field(
        default=50.0,
        metadata=_doc(
            "reply gate: a member this many times farther than the typical member from the "
            "median is left out"
        ),
    )
    quarantine_after: int = field(
        default=3,
        metadata=_doc(
            "reply gate: a member rejected, or failing with an error of its own, this many "
            "rounds in a row is quarantined"
        ),
    )

    def check(self) -> None:
        _greater("outlier-factor", self.outlier_factor, 0.0)
        _at_least("quarantine-after", self.quarantine_after, 1)


@dataclass(frozen=True)
class FinalConfig(Section):
    """The final step: the soup, its BatchNorm recalibration, the values' type on the way,
    and evaluation."""

    title: ClassVar[str] = "Final step"

    final_dtype: str = field(
        default="float32",
        metadata=_doc(
            f"one of {_listed(WIRE_DTYPES)}: the final step's values (the members collected, "
            "the soup sent down; the soup is rounded to it, so members evaluate the saved model)"
        ),
    )
    soup: str = field(
        default="uniform",
        metadata=_doc(f"one of {_listed(SOUPS)}: the soup saved as the final model"),
    )
    bn_recalibration: bool = field(
        default=True, metadata=_doc("recompute the soup's BatchNorm statistics")
    )
    bn_batches: int = field(
        default=50, metadata=_doc("training batches per member for BN recalibration")
    )
    eval_batch_size: int = field(default=1000, metadata=_doc("batch size for evaluation"))

    def check(self) -> None:
        _one_of("final-dtype", self.final_dtype, WIRE_DTYPES)
        _one_of("soup", self.soup, SOUPS)
        _at_least("bn-batches", self.bn_batches, 1)
        _at_least("eval-batch-size", self.eval_batch_size, 1)


@dataclass(frozen=True)
class RuntimeConfig(Section):
    """Flower's runtime: how long the server waits, how often it looks, member workers, and
    resuming a run."""

    title: ClassVar[str] = "Flower runtime"

    round_timeout: float = field(
        default=600.0, metadata=_doc("Flower: seconds to wait for the members' replies")
    )
    poll_interval: float = field(
        default=0.5, metadata=_doc("Flower: seconds between the server's checks for replies")
    )
    straggler_factor: float = field(
        default=3.0,
        metadata=_doc(
            "Flower: once more than half of a round's members replied (after t s), wait for "
            "the rest until max(straggler-min-wait, this x t) s more; 0: the whole round-timeout"
        ),
    )
    straggler_min_wait: float = field(
        default=60.0,
        metadata=_doc("Flower: the least time a round waits for its last members (see above)"),
    )
    node_wait_timeout: float = field(
        default=300.0, metadata=_doc("Flower: seconds to wait for num-members SuperNodes")
    )
    worker_idle_timeout: float = field(
        default=1800.0,
        metadata=_doc("Flower: a member worker without a message for this long exits"),
    )
    resume_from: str = field(
        default="",
        metadata=_doc("Flower: a stopped or failed run's folder (runs/<...>) to continue"),
    )
    member_checkpoints: str = field(
        default="runs/members",
        metadata=_doc(
            "Flower: where a member without a worker checkpoints itself each round; '': off"
        ),
    )

    def check(self) -> None:
        _greater("round-timeout", self.round_timeout, 0.0)
        _at_most("round-timeout", self.round_timeout, MAX_TIMEOUT)
        _greater("node-wait-timeout", self.node_wait_timeout, 0.0)
        _at_most("node-wait-timeout", self.node_wait_timeout, MAX_TIMEOUT)
        _greater("poll-interval", self.poll_interval, 0.0)
        _at_most("poll-interval", self.poll_interval, min(MAX_POLL_INTERVAL, self.round_timeout))
        _greater("worker-idle-timeout", self.worker_idle_timeout, 0.0)
        _at_most("worker-idle-timeout", self.worker_idle_timeout, MAX_TIMEOUT)
        _at_least("straggler-factor", self.straggler_factor, 0.0)
        _at_least("straggler-min-wait", self.straggler_min_wait, 0.0)

    @property
    def stragglers(self) -> StragglerWait:
        """How long a training round waits for its last members."""
        return StragglerWait(self.straggler_factor, self.straggler_min_wait)


@dataclass(frozen=True)
class OutputConfig(Section):
    """What the run reports and keeps: its folder, progress evaluations, the members'
    weights, Prometheus metrics."""

    title: ClassVar[str] = "Output"

    output_dir: str = field(
        default="runs", metadata=_doc("directory that receives one folder per run")
    )
    eval_every: int = field(
        default=5, metadata=_doc("Flower: members report test accuracy every K rounds; 0: never")
    )
    save_members: bool = field(
        default=False, metadata=_doc("also save every member's final weights (members.pt)")
    )
    metrics_port: int = field(
        default=0, metadata=_doc("Flower: ServerApp serves Prometheus metrics on this port; 0: off")
    )
    metrics_grace: float = field(
        default=0.0, metadata=_doc("Flower: seconds to keep serving metrics after the run")
    )
    metrics_pushgateway: str = field(
        default="", metadata=_doc("Flower: push the final metrics to this Pushgateway (host:port)")
    )

    def check(self) -> None:
        _at_least("eval-every", self.eval_every, 0)
        _in_range("metrics-port", self.metrics_port, 0, 65535)
        _at_least("metrics-grace", self.metrics_grace, 0.0)


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "exchange": ExchangeConfig,
    "gate": GateConfig,
    "final": FinalConfig,
    "runtime": RuntimeConfig,
    "output": OutputConfig,
}
"""Each section by its attribute of :class:`WashFedConfig`, in the reference's order."""


@dataclass(frozen=True)
class WashFedConfig:
    """The run's shape (strategy, members, rounds, seed) and one section per component.
    Defaults run on a CPU in minutes (Fashion-MNIST)."""

    title: ClassVar[str] = "The run"

    strategy: str = field(default="wash", metadata=_doc(f"one of {_listed(STRATEGIES)}"))
    num_members: int = field(default=4, metadata=_doc("population size N (Flower: SuperNodes)"))
    min_members: int = field(
        default=0,
        metadata=_doc(
            "Flower: start with this many members checked once node-wait-timeout is over, "
            "the others taken in when they come; 0: wait for all num-members"
        ),
    )
    num_server_rounds: int = field(
        default=30, metadata=_doc("training rounds (a shuffle after each but the last)")
    )
    seed: int = field(default=0, metadata=_doc("run seed: initialisations, data order, masks"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        strategy = STRATEGY_ALIASES.get(self.strategy, self.strategy)
        object.__setattr__(self, "strategy", strategy)
        _check_numbers(self)  # the run's own numbers; the sections checked theirs
        _one_of("strategy", self.strategy, STRATEGIES)
        _at_least("num-members", self.num_members, 1)
        _in_range("min-members", self.min_members, 0, self.num_members)
        _at_least("num-server-rounds", self.num_server_rounds, 1)
        _at_least("seed", self.seed, 0)
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        """The rules that tie one section's keys to another's (or to the strategy)."""
        if (
            self.final.soup == "greedy"
            and self.data.holdout_size == 0
            and not (self.data.validation_path)
        ):
            raise ConfigError(
                "soup='greedy' needs held-out data: set holdout-size > 0 or validation-path"
            )
        if self.runtime.resume_from and self.strategy == "fedavg":
            raise ConfigError(
                "resume-from continues wash, papa, papa-all and ensemble runs; "
                "fedavg (Flower's own strategy) keeps no checkpoint"
            )
        if self.exchange.shuffle_optimizer_state and self.optim.momentum == 0.0:
            raise ConfigError("shuffle-optimizer-state needs optimizer state: set momentum > 0")

    @property
    def label(self) -> str:
        """The strategy's name in reports: ``wash+opt`` for WASH with optimizer state."""
        with_state = self.strategy == "wash" and self.exchange.shuffle_optimizer_state
        return "wash+opt" if with_state else self.strategy

    @property
    def final_round(self) -> int:
        """The round number the final step's messages carry: the one after the last."""
        return self.num_server_rounds + 1

    @property
    def total_steps(self) -> int:
        """Optimizer steps each member takes over the run."""
        return self.num_server_rounds * self.optim.local_steps

    def evaluates_at(self, server_round: int) -> bool:
        """Whether members report test accuracy with their replies of ``server_round``:
        every ``eval-every`` rounds and at the last one (never with ``eval-every = 0``)."""
        every = self.output.eval_every
        return every > 0 and (server_round % every == 0 or server_round == self.num_server_rounds)

    def shuffle_mask(self, numels: Sequence[int], event: int) -> ShuffleMask:
        """This run's WASH mask of shuffle event ``event`` (:func:`wash_fed.shuffle.wash_mask`)
        over parameter tensors of ``numels`` scalars."""
        return self.member_settings.shuffle_mask(numels, event)

    @property
    def member_settings(self) -> MemberSettings:
        """What a member must know of this run to take part in its exchanges."""
        return MemberSettings(self.strategy, self.num_members, self.seed, self.exchange, self.final)

    def training_changes(self, other: WashFedConfig) -> list[str]:
        """The keys whose values differ between two configurations, leaving out those a
        resumed run may change (:data:`RESUMABLE_CHANGES`: where things go, timeouts,
        metrics, the device)."""
        mine, theirs = self.to_mapping(), other.to_mapping()
        # The format each sends, not the setting: "auto" and the type it stands for agree.
        mine[WIRE_DTYPE_KEY] = self.exchange.wire_dtype_for(self.strategy)
        theirs[WIRE_DTYPE_KEY] = other.exchange.wire_dtype_for(other.strategy)
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> WashFedConfig:
        """Parse kebab-case (or snake_case) keys, as found in Flower's ``run_config``.

        Unknown keys and values of the wrong type are errors; missing keys take defaults.
        """
        given: dict[str | None, dict[str, object]] = {}
        for key, value in values.items():
            where = _KEYS.get(key.replace("_", "-"))
            if where is None:
                raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(_KEYS)}")
            section, f = where
            given.setdefault(section, {})[f.name] = _coerce(key, value, _HINTS[f.name, section])
        sections = {name: kind(**given.get(name, {})) for name, kind in SECTIONS.items()}
        return cls(**given.get(None, {}), **sections)  # type: ignore[arg-type]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> WashFedConfig:
        """The settings a Flower app's ``run_config`` holds: its keys that are keys of this
        configuration, checked as :meth:`from_mapping` checks them; the app's own keys are
        left to it (a misspelt key of this configuration is one of them)."""
        ours = {k: v for k, v in run_config.items() if k.replace("_", "-") in _KEYS}
        return cls.from_mapping(ours)

    def to_mapping(self) -> dict[str, ConfigValue]:
        """The configuration as kebab-case keys, the inverse of :meth:`from_mapping`."""
        return {
            key: getattr(self if section is None else getattr(self, section), f.name)
            for key, (section, f) in _KEYS.items()
        }

    def with_values(self, values: Mapping[str, object]) -> WashFedConfig:
        """This configuration with the kebab-case keys of ``values`` set (checked anew)."""
        return WashFedConfig.from_mapping({**self.to_mapping(), **values})

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each kebab-case key with its description."""
        return {key: f.metadata["help"] for key, (_, f) in _KEYS.items()}


@dataclass(frozen=True)
class MemberSettings:
    """What a member must know of a run to take part in its exchanges, whatever trains it:
    the run's shape, the exchange section (WASH's masks and PAPA's rate, the values' type on
    the wire) and the final step's (its values' type, the BatchNorm batches). The server
    sends them to every member when it greets it; the attributes are those of
    :class:`WashFedConfig`, so the member protocol takes either."""

    strategy: str
    num_members: int
    seed: int
    exchange: ExchangeConfig
    final: FinalConfig

    def shuffle_mask(self, numels: Sequence[int], event: int) -> ShuffleMask:
        """The WASH mask of shuffle event ``event`` (:func:`wash_fed.shuffle.wash_mask`)
        over parameter tensors of ``numels`` scalars, derived from ``(seed, event)``."""
        return wash_mask(
            numels,
            event,
            shuffle_prob=self.exchange.shuffle_prob,
            schedule=self.exchange.layer_schedule,
            seed=self.seed,
        )

    def to_mapping(self) -> dict[str, ConfigValue]:
        """These settings as the run configuration's kebab-case keys."""
        return {
            key: value for key, value in self._whole().to_mapping().items() if key in _MEMBER_KEYS
        }

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> MemberSettings:
        """Settings from kebab-case keys (those of :meth:`to_mapping`), checked as the
        configuration checks them; ConfigError names a key that is not one of them."""
        others = sorted(set(values) - _MEMBER_KEYS)
        if others:
            raise ConfigError(f"{', '.join(others)}: not a member's settings")
        return WashFedConfig.from_mapping(values).member_settings

    def _whole(self) -> WashFedConfig:
        return WashFedConfig(
            strategy=self.strategy,
            num_members=self.num_members,
            seed=self.seed,
            exchange=self.exchange,
            final=self.final,
        )


def _key_table() -> Iterator[tuple[str, tuple[str | None, dataclasses.Field[Any]]]]:
    """Every key: the section that holds it (None: the run's own) and its field."""
    for f in dataclasses.fields(WashFedConfig):
        if f.name not in SECTIONS:
            yield _key(f), (None, f)
    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(typing.cast(Any, kind)):
            yield _key(f), (section, f)


_KEYS = dict(_key_table())
_MEMBER_KEYS = frozenset(
    key
    for key, (section, f) in _KEYS.items()
    if section in ("exchange", "final") or (section is None and f.name != "num_server_rounds")
)
_HINTS: dict[tuple[str, str | None], type] = {
    (name, section): kind
    for section, owner in ((None, WashFedConfig), *SECTIONS.items())
    for name, kind in typing.get_type_hints(owner).items()
}


_TEXT_PARSERS: dict[type, Callable[[str], Any]] = {
    bool: lambda text: {"true": True, "false": False}[text.lower()],
    int: int,
    float: float,
}


def _coerce(key: str, value: object, kind: type) -> object:
    """Check ``value`` against the field type ``kind``; accept text from command lines."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str) and kind in _TEXT_PARSERS:
        try:
            return _TEXT_PARSERS[kind](value)
        except (KeyError, ValueError):
            pass
    raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}")


def _pixels(text: str) -> tuple[int, int]:
    """``"HxW"`` or ``"N"`` as (height, width); ConfigError unless both are >= 1."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ConfigError(f"image-size must be 'HxW' or 'N' with sizes >= 1, got {text!r}")
    return sizes[0], sizes[1]


def _per_channel(key: str, text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers (empty text: none)."""
    if not text.strip():
        return ()
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{key} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{key} must be finite, got {text!r}")
    return values


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # also rejects NaN
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def _greater(key: str, value: float, low: float) -> None:
    if not value > low:
        raise ConfigError(f"{key} must be > {low}, got {value}")


def _at_most(key: str, value: float, high: float) -> None:
    if not value <= high:
        raise ConfigError(f"{key} must be <= {high:g}, got {value:g}")


def _in_range(key: str, value: float, low: float, high: float, *, closed_high: bool = True) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"{key} must be in [{low}, {high}{bracket}, got {value}")


def toml_value(value: ConfigValue) -> str:
    """``value`` as TOML writes it (and ``flwr run --run-config`` reads it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def reference() -> str:
    """The configuration reference (``docs/configuration.md``): every key with its type,
    default and meaning, by section, generated from :class:`WashFedConfig`."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m wash_fed.config --reference > docs/configuration.md`;"
        " edit wash_fed/config.py, not this file. -->",
        "",
        "Every key of the run configuration (`wash_fed.config.WashFedConfig`), by section. Set",
        'one with `flwr run . --run-config "key=value"`, in a TOML file of overrides, or with',
        "the population trainer's `--key value`. Each is declared with its default in",
        "`pyproject.toml` (`[tool.flwr.app.config]`); a value out of range is an error naming",
        "the key and what is allowed, before any training. Keys whose meaning starts with",
        "*Flower:* matter to runs through Flower only. Keys are flat; in Python each lives in",
        "its section (`cfg.optim.batch_size` is `batch-size`).",
    ]
    owners: list[tuple[str | None, type[Section] | type[WashFedConfig]]] = [
        (None, WashFedConfig),
        *SECTIONS.items(),
    ]
    for section, owner in owners:
        where = "`cfg`" if section is None else f"`cfg.{section}`"
        lines += [
            "",
            f"## {owner.title}",
            "",
            f"{_first_line(owner.__doc__)} In Python: {where}.",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, (held_by, f) in _KEYS.items():
            if held_by != section:
                continue
            default = toml_value(typing.cast(ConfigValue, f.default))
            text = f.metadata["help"].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            lines.append(f"| `{key}` | {_HINTS[f.name, section].__name__} | `{default}` | {text} |")
    return "\n".join(lines) + "\n"


def _first_line(doc: str | None) -> str:
    """A docstring's first sentence, on one line."""
    return " ".join((doc or "").split("\n\n")[0].split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wash_fed.config", description=__doc__)
    parser.add_argument(
        "--reference", action="store_true", help="print the configuration reference (Markdown)"
    )
    args = parser.parse_args(argv)
    if args.reference:
        print(reference(), end="")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
