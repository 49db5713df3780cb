"""The ServerApp's checkpoint: what a run needs to continue after its ServerApp died or
was stopped (``resume-from``).

Written after every round to ``checkpoint.pt`` in the run's folder, atomically (aside,
flushed, renamed), after the round's row in ``results.json``: the round, the strategy's
state (deliveries still due, history, members missing, quarantine), the ledger, the
results' rows, the members' credentials, and which runs hold the members' matching
checkpoints. The shuffle's randomness is derived from (seed, round) and needs no state.
The file is a pickle: load only checkpoints of your own runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wash_fed.config import ConfigError, ConfigValue, WashFedConfig
from wash_fed.files import save_torch
from wash_fed.ledger import LedgerEntry
from wash_fed.results import RESULTS, RoundResult, read_results
from wash_fed.strategy.state import StrategyState
from wash_fed.strategy.wash import Continuation

__all__ = ["CHECKPOINT", "ServerCheckpoint"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class ServerCheckpoint:
    """A run as of the end of ``round``."""

    config: dict[str, ConfigValue]
    run_id: int
    """The run whose members checkpointed this round."""
    earlier_runs: list[int]
    """The runs this one continued, oldest first."""
    round: int
    state: StrategyState
    """The population strategy's state (deliveries due, history, missing, quarantine)."""
    ledger: list[LedgerEntry]
    rows: list[RoundResult]
    """The rounds of ``results.json``."""
    credentials: dict[int, str]
    """Partition id -> the credential its member holds (:mod:`wash_fed.strategy.roster`)."""

    @property
    def chain(self) -> list[int]:
        """Every run this checkpoint's members were trained in, oldest first."""
        return [*self.earlier_runs, self.run_id]

    @property
    def continuation(self) -> Continuation:
        """Where the run that resumes from this checkpoint takes it up."""
        return Continuation(self.run_id, self.round, self.state, dict(self.credentials), self.chain)

    def save(self, directory: Path) -> None:
        save_torch(directory / CHECKPOINT, self)

    @classmethod
    def load(cls, directory: Path, cfg: WashFedConfig) -> ServerCheckpoint:
        """The checkpoint in a run's folder, checked against the configuration of the run
        that continues it. Raises ConfigError naming what is missing or different."""
        path = directory / CHECKPOINT
        if not path.is_file():
            raise ConfigError(
                f"resume-from={str(directory)!r}: no {CHECKPOINT} there (a run's folder under "
                "output-dir; only wash, papa, papa-all and ensemble runs write one)"
            )
        results = directory / RESULTS
        if results.is_file() and read_results(results).status == "completed":
            raise ConfigError(f"resume-from: the run in {directory} completed; nothing to resume")
        saved = torch.load(path, weights_only=False)
        if not isinstance(saved, cls):
            raise ConfigError(f"resume-from: {path} is not a wash-fed server checkpoint")
        changed = cfg.training_changes(WashFedConfig.from_mapping(saved.config))
        if changed:
            raise ConfigError(
                f"resume-from: the run in {directory} was trained with other "
                + ", ".join(f"{k} ({saved.config[k]!r})" for k in changed)
                + "; resume it with the same values"
            )
        return saved
