"""A run's results on disk and on the console.

Everything lands in one directory per run: ``results.json`` (configuration, per-round
figures, final accuracies, byte totals; rewritten after every round, so a run that fails
keeps what it had), ``ledger.csv`` (every message), ``final_model.pt`` and, on request,
``members.pt``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log
from torch import Tensor

from wash_fed.config import WashFedConfig
from wash_fed.ledger import Ledger

__all__ = ["RunOutput", "ledger_table"]


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.3f} MB"


def ledger_table(ledger: Ledger, fedavg_bytes: int | None, rounds: int) -> str:
    """The bytes a run sent by phase and direction, next to FedAvg's for the same rounds."""
    phases = sorted(
        {e.phase for e in ledger.entries},
        key=["setup", "train", "collect", "bn", "evaluate", "end"].index,
    )
    lines = [f"{'phase':<10} {'up':>16} {'down':>16} {'total':>16}"]
    for phase in phases:
        up, down = ledger.total("up", phase), ledger.total("down", phase)
        lines.append(f"{phase:<10} {_mb(up):>16} {_mb(down):>16} {_mb(up + down):>16}")
    up, down = ledger.total("up"), ledger.total("down")
    lines.append(f"{'all':<10} {_mb(up):>16} {_mb(down):>16} {_mb(up + down):>16}")
    if fedavg_bytes:
        train = ledger.total(phase="train")
        lines.append(
            f"FedAvg for the same {rounds} rounds: {_mb(fedavg_bytes)} "
            f"(training traffic here is {train / fedavg_bytes:.4f} of it)"
        )
    return "\n".join(lines)


@dataclass
class RunOutput:
    """The directory of one run and the results written into it."""

    directory: Path
    cfg: WashFedConfig
    ledger: Ledger
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, cfg: WashFedConfig, run_id: int, ledger: Ledger) -> RunOutput:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        directory = (Path(cfg.output_dir) / f"{stamp}-{cfg.label}-{run_id}").resolve()
        directory.mkdir(parents=True, exist_ok=True)
        out = cls(directory, cfg, ledger)
        out.results = {
            "run_id": run_id,
            "label": cfg.label,
            "strategy": cfg.strategy,
            "config": cfg.to_mapping(),
            "status": "running",
            "rounds": [],
        }
        out.write()
        return out

    def add_round(self, row: Mapping[str, Any]) -> None:
        self.results["rounds"].append(dict(row))
        self.write()

    def write(self, **fields: Any) -> None:
        """Update the results with ``fields`` and rewrite ``results.json`` and ``ledger.csv``."""
        self.results.update(fields)
        self.results["bytes"] = self.ledger.summary()
        self.results["wall_seconds"] = time.perf_counter() - self.started
        tmp = self.directory / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=float))
        tmp.replace(self.directory / "results.json")
        self.ledger.write_csv(self.directory / "ledger.csv")

    def save_model(self, state_dict: Mapping[str, Tensor], name: str = "final_model.pt") -> Path:
        path = self.directory / name
        torch.save(
            {"model": self.cfg.model, "dataset": self.cfg.dataset, "state_dict": dict(state_dict)},
            path,
        )
        return path

    def finish(self, final: Mapping[str, Any], fedavg_bytes: int | None) -> None:
        self.write(status="completed", final=dict(final), fedavg_bytes=fedavg_bytes)
        log(INFO, "")
        log(INFO, "Bytes sent (payload as Flower serializes it):")
        for line in ledger_table(
            self.ledger, fedavg_bytes, self.cfg.num_server_rounds
        ).splitlines():
            log(INFO, "  %s", line)
        log(INFO, "Final model: %s", self.directory / "final_model.pt")
        log(INFO, "Results:     %s", self.directory / "results.json")

    def fail(self, error: BaseException) -> None:
        self.write(status="failed", error=f"{type(error).__name__}: {error}")
        log(INFO, "Run failed; results so far are in %s", self.directory)
