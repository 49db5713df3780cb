"""A run's results on disk, one layout for both runners (the ServerApp and the population
trainer).

One folder per run holds ``results.json``, ``ledger.csv`` (every message; see
:mod:`wash_fed.ledger`), ``final_model.pt`` and, on request, ``members.pt``, each written
whole (:mod:`wash_fed.files`). ``results.json`` is rewritten whenever something changes, so
a run that fails keeps what it had. Its keys (``docs/running.md`` documents them):

* ``runner`` (``flower`` or ``population``), ``label``, ``strategy``, ``config``;
* ``status``: ``running``, then ``completed``, ``failed`` (with ``error``) or ``stopped``;
* ``rounds``: one row per round, as the runner reports it;
* ``final``: the final figures (``final_accuracy`` always; members, ensemble, soups for
  the population strategies);
* ``bytes``: the ledger's totals by direction and phase; ``fedavg_bytes``: what FedAvg
  would have sent over the same rounds (:func:`fedavg_equivalent_bytes`);
* ``wall_seconds``: since the run started; and what else the runner adds (the ServerApp:
  ``run_id``, ``members``; the population trainer: ``device``, ``threads``, ``epochs``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from wash_fed.config import WashFedConfig
from wash_fed.files import save_torch, write_json
from wash_fed.ledger import Ledger

__all__ = ["RESULTS", "RunResults", "fedavg_equivalent_bytes"]

RESULTS = "results.json"
Runner = Literal["flower", "population"]


def fedavg_equivalent_bytes(rounds: int, members: int, down: int, up: int) -> int:
    """What FedAvg sends over ``rounds`` rounds: the global model down to every member and
    each member's model up, every round (``down`` and ``up``: one message each way, as the
    runner measures messages)."""
    return rounds * members * (down + up)


@dataclass
class RunResults:
    """The folder of one run and the results written into it."""

    directory: Path
    cfg: WashFedConfig
    ledger: Ledger
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(
        cls, directory: Path, cfg: WashFedConfig, ledger: Ledger, runner: Runner, **header: Any
    ) -> RunResults:
        """A new run's folder with its ``results.json`` (status ``running``)."""
        directory.mkdir(parents=True, exist_ok=True)
        out = cls(directory, cfg, ledger)
        out.results = {
            "runner": runner,
            "label": cfg.label,
            "strategy": cfg.strategy,
            **header,
            "config": cfg.to_mapping(),
            "status": "running",
            "rounds": [],
        }
        out.write()
        return out

    def write(self, **fields: Any) -> None:
        """Update the results with ``fields`` and rewrite ``results.json`` and
        ``ledger.csv``. Raises ``OSError`` naming the file that could not be written."""
        self.results.update(fields)
        self.results["bytes"] = self.ledger.summary()
        self.results["wall_seconds"] = time.perf_counter() - self.started
        write_json(self.directory / RESULTS, self.results)
        self.ledger.write_csv(self.directory / "ledger.csv")

    def save_model(self, state_dict: Mapping[str, Tensor], name: str = "final_model.pt") -> Path:
        """``{"model", "dataset", "state_dict"}`` into ``name`` in the run's folder."""
        path = self.directory / name
        saved = {
            "model": self.cfg.model,
            "dataset": self.cfg.dataset,
            "state_dict": dict(state_dict),
        }
        save_torch(path, saved)
        return path
