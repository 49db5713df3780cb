"""What a run produces, as types: a row per round (:class:`RoundResult`), per epoch for the
population trainer (:class:`EpochResult`), the final step's figures (:class:`FinalResult`)
and the run itself (:class:`RunResult`), written to and read from ``results.json`` here and
nowhere else (:func:`write_results`, :func:`read_results`).

One folder per run (:class:`RunFolder`) holds ``results.json``, ``ledger.csv`` (every
message; see :mod:`wash_fed.ledger`), ``final_model.pt`` and, on request, ``members.pt``,
each written whole (:mod:`wash_fed.files`). ``results.json`` is rewritten whenever something
changes, so a run that fails keeps what it had. Both runners (the ServerApp and the
population trainer) write the same layout; ``docs/running.md`` documents it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import PlainSerializer, PlainValidator, TypeAdapter, ValidationError
from torch import Tensor

from wash_fed.config import ConfigValue, WashFedConfig
from wash_fed.files import save_torch, write_json
from wash_fed.keys import Metrics
from wash_fed.ledger import Ledger
from wash_fed.timing import PARTS, RoundTime

__all__ = [
    "GLOBAL_MODEL",
    "RESULTS",
    "EpochResult",
    "ExchangeResult",
    "FinalResult",
    "ResultsError",
    "ResumedFrom",
    "RoundResult",
    "RunFolder",
    "RunResult",
    "bytes_sent",
    "fedavg_equivalent_bytes",
    "read_results",
    "write_results",
]

RESULTS = "results.json"
GLOBAL_MODEL = "global"
"""FedAvg's final model, as :attr:`FinalResult.final_model` names it."""
Runner = Literal["flower", "population"]
Status = Literal["running", "completed", "failed", "stopped"]


def bytes_sent(totals: Mapping[str, int], direction: str | None = None, *phases: str | None) -> int:
    """From a ledger's totals (:meth:`wash_fed.ledger.Ledger.summary`): bytes sent in
    ``direction`` (both when None), in ``phases`` (all when none is given)."""
    directions = [direction] if direction else ["up", "down"]
    wanted = [p for p in phases if p is not None]
    if not wanted:
        return sum(totals.get(d, 0) for d in directions)
    return sum(totals.get(f"{d}.{p}", 0) for d in directions for p in wanted)


def fedavg_equivalent_bytes(rounds: int, members: int, down: int, up: int) -> int:
    """What FedAvg sends over ``rounds`` rounds: the global model down to every member and
    each member's model up, every round (``down`` and ``up``: one message each way, as the
    runner measures messages)."""
    return rounds * members * (down + up)


class ResultsError(ValueError):
    """A ``results.json`` that is not one (malformed, of another layout), or a run without
    what was asked of it."""


@dataclass(frozen=True)
class RoundResult:
    """One round as its runner saw it."""

    round: int
    seconds: float
    """The round's wall time."""
    bytes_up: int
    """What the round's messages carried up, and down (the ledger's count)."""
    bytes_down: int
    bytes_total: int
    """Everything the run sent so far."""
    members: dict[str, Metrics]
    """By partition id: what each member whose reply was accepted reported."""
    loss: float | None = None
    """The members' mean training loss (None: no member reported one)."""
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    """The members' mean test accuracy (FedAvg: the global model's) where evaluated."""
    failed: dict[str, str] = field(default_factory=dict)
    """By partition id: why a member sent no usable reply."""
    rejected: dict[str, str] = field(default_factory=dict)
    """By partition id: why the reply gate left a member's reply out."""
    exchange: dict[str, int] = field(default_factory=dict)
    """What the strategy moved (WASH: ``selected``, ``moved``, ``participants``)."""
    exchange_digest: str = ""
    """Fingerprint of the round's deliveries: equal digests, equal exchanges."""
    time: RoundTime | None = None
    """Where the round's time went (Flower runs: :mod:`wash_fed.timing`)."""
    elapsed: float = 0.0
    """Seconds since the run (or its resumption) started, when the round ended."""

    @property
    def answered(self) -> int:
        """Members whose reply was accepted."""
        return len(self.members)


@dataclass(frozen=True)
class ExchangeResult:
    """A message round outside training -- the members' hello, the final step's -- and
    where its time went."""

    phase: str
    """Its ledger phase (``setup``, ``collect``, ``bn``, ``evaluate``, ``end``)."""
    round: int
    """The round its messages name (0: before training)."""
    seconds: float
    """From the push of its messages to the last reply the server waited for."""
    bytes_up: int
    bytes_down: int
    time: RoundTime
    """Its parts (:mod:`wash_fed.timing`)."""
    elapsed: float = 0.0
    """Seconds since the run (or its resumption) started, when it ended."""


@dataclass(frozen=True)
class EpochResult:
    """The population trainer's progress after an epoch of member 0's data (and the last
    round)."""

    epoch: float
    round: int
    loss: float
    train_accuracy: float
    bytes: int
    seconds: float
    member_mean: float | None = None
    """The members' mean test accuracy (None: not evaluated)."""
    soup: float | None = None
    """The plain uniform soup's test accuracy (no BatchNorm recalibration)."""


@dataclass(frozen=True)
class FinalResult:
    """The final step's figures: test accuracies of the members, their ensemble, the soups
    and the final model, and who made it into the soup."""

    final_accuracy: float
    final_model: str
    """Which model was saved: a soup (``uniform+bn``, ``greedy``, ...) or FedAvg's
    ``global`` model."""
    members: list[float] = field(default_factory=list)
    """Each member's accuracy (none for FedAvg)."""
    ensemble: float | None = None
    """The output ensemble's accuracy (None: not evaluated, e.g. no server test set)."""
    soups: dict[str, float] = field(default_factory=dict)
    """Accuracy per soup: ``uniform``, ``uniform+bn``, ``greedy``, ``greedy+bn``."""
    greedy_ingredients: dict[str, list[int]] = field(default_factory=dict)
    collected: list[int] = field(default_factory=list)
    """Flower: the partition ids whose models went into the soup."""
    quarantined: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    """Flower: by partition id, why a member's final-step reply was left out."""
    bn_exchanges: int = 0
    """Flower: message rounds for the federated BatchNorm recalibration."""
    evaluated_on: Literal["server", "members"] = "server"
    members_own_evaluation: dict[str, float] = field(default_factory=dict)
    """Flower: each member's accuracy of the final model on its own test data."""

    @property
    def member_mean(self) -> float | None:
        """The members' mean accuracy (None for FedAvg)."""
        return sum(self.members) / len(self.members) if self.members else None


@dataclass(frozen=True)
class ResumedFrom:
    """The run a resumed run continues: its folder, its run id, its last round."""

    folder: str
    run_id: int
    round: int


def _config_from(value: object) -> WashFedConfig:
    if isinstance(value, WashFedConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"a configuration is a mapping of keys, got {type(value).__name__}")
    return WashFedConfig.from_mapping(value)


def _config_to(cfg: WashFedConfig) -> dict[str, ConfigValue]:
    return cfg.to_mapping()


RunConfig = Annotated[
    WashFedConfig, PlainValidator(_config_from), PlainSerializer(_config_to, return_type=dict)
]
"""A run's configuration in ``results.json``: its kebab-case keys."""


@dataclass
class RunResult:
    """A run: what ran, how it ended, its rounds, its final step and its bytes."""

    runner: Runner
    label: str
    """The strategy's name in reports (``wash+opt`` for WASH with optimizer state)."""
    config: RunConfig
    status: Status = "running"
    error: str = ""
    """Why the run failed (empty unless ``status`` is ``failed``)."""
    rounds: list[RoundResult] = field(default_factory=list)
    exchanges: list[ExchangeResult] = field(default_factory=list)
    """Flower runs: the message rounds outside training, in order."""
    epochs: list[EpochResult] = field(default_factory=list)
    """The population trainer's progress by epoch (none for Flower runs)."""
    final: FinalResult | None = None
    """None until the run completed."""
    bytes: dict[str, int] = field(default_factory=dict)
    """The ledger's totals: ``up``, ``down``, ``total``, and ``<direction>.<phase>``."""
    fedavg_bytes: int | None = None
    """What FedAvg would have sent over the same rounds (None for FedAvg itself)."""
    wall_seconds: float = 0.0
    run_id: int | None = None
    """Flower's run id (None for the population trainer)."""
    members: dict[str, int] = field(default_factory=dict)
    """Flower: partition id -> node id."""
    resumed_from: ResumedFrom | None = None
    device: str = ""
    """The population trainer's device and torch threads (another count sums in another
    order)."""
    threads: int = 0
    train_seconds: float = 0.0
    model_bytes: int = 0
    """The population trainer: one member's model as it travels in ``wire-dtype``."""

    @property
    def strategy(self) -> str:
        return self.config.strategy

    def final_figures(self) -> FinalResult:
        """The final figures of a run that completed; ResultsError naming how it ended
        otherwise."""
        if self.status != "completed" or self.final is None:
            ended = f"{self.status}: {self.error}" if self.error else self.status
            raise ResultsError(f"the {self.label} run has no final figures ({ended})")
        return self.final

    def mean_round_seconds(self) -> float:
        """A round's mean wall time (0 before the first round)."""
        return sum(r.seconds for r in self.rounds) / max(len(self.rounds), 1)

    def mean_round_time(self) -> RoundTime:
        """Where a round's time went, on average over the rounds that say (all zero where
        none does)."""
        split = [r.time for r in self.rounds if r.time is not None]
        count = max(len(split), 1)
        return RoundTime(*(sum(getattr(t, part) for t in split) / count for part in PARTS))

    def sent(self, direction: str | None = None, phase: str | None = None) -> int:
        """Bytes sent in ``direction`` (both when None), in ``phase`` (all when None)."""
        return bytes_sent(self.bytes, direction, phase)


_RUN_RESULT = TypeAdapter(RunResult)


def write_results(path: Path, result: RunResult) -> None:
    """``result`` into ``path`` as indented JSON, atomically (a diverged run's NaN as
    ``NaN``, which :func:`read_results` reads back)."""
    write_json(path, _RUN_RESULT.dump_python(result))


def read_results(path: Path) -> RunResult:
    """The run in ``path`` (a ``results.json``, or the run folder holding one). Raises
    ResultsError naming the file and what in it is not a run's results."""
    if path.is_dir():
        path = path / RESULTS
    try:
        return _RUN_RESULT.validate_json(path.read_bytes())
    except ValidationError as err:
        raise ResultsError(f"{path} is not a wash-fed results file: {err}") from None


@dataclass
class RunFolder:
    """The folder of one run and its results, rewritten on :meth:`write`."""

    directory: Path
    result: RunResult
    ledger: Ledger
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, directory: Path, result: RunResult, ledger: Ledger) -> RunFolder:
        """A new run's folder with its ``results.json`` (status ``running``)."""
        directory.mkdir(parents=True, exist_ok=True)
        folder = cls(directory, result, ledger)
        folder.write()
        return folder

    def write(self) -> None:
        """Rewrite ``results.json`` (with the ledger's totals and the wall time so far)
        and ``ledger.csv``. Raises ``OSError`` naming the file that could not be written."""
        self.result.bytes = self.ledger.summary()
        self.result.wall_seconds = time.perf_counter() - self.started
        write_results(self.directory / RESULTS, self.result)
        self.ledger.write_csv(self.directory / "ledger.csv")

    def save_model(self, state_dict: Mapping[str, Tensor], name: str = "final_model.pt") -> Path:
        """``{"model", "dataset", "state_dict"}`` into ``name`` in the run's folder."""
        path = self.directory / name
        cfg = self.result.config
        save_torch(
            path,
            {"model": cfg.model.name, "dataset": cfg.data.dataset, "state_dict": dict(state_dict)},
        )
        return path
