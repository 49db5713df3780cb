"""A run's results on disk and on the console.

Everything lands in one directory per run: ``results.json`` (configuration, per-round
figures, final accuracies, byte totals; rewritten after every round, so a run that fails
keeps what it had), ``ledger.csv`` (every message), ``final_model.pt`` and, on request,
``members.pt``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO
from pathlib import Path
from typing import Protocol

from flwr.common.logger import log
from torch import Tensor

from wash_fed.config import WashFedConfig
from wash_fed.keys import Metric
from wash_fed.ledger import Ledger
from wash_fed.protocol import fedavg_format
from wash_fed.results import ExchangeResult, FinalResult, RoundResult, RunFolder, RunResult
from wash_fed.strategy.state import RoundReport
from wash_fed.timing import RoundTime

__all__ = ["Checkpoint", "RunOutput", "ledger_table", "progress_line", "round_row"]


class Checkpoint(Protocol):
    """Something the run writes into its folder after a round (the built-in ServerApp's
    checkpoint, which ``resume-from`` reads)."""

    def save(self, directory: Path) -> None: ...


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.3f} MB"


def ledger_table(ledger: Ledger, fedavg_bytes: int | None, rounds: int, wire: str) -> str:
    """The bytes a run sent by phase and direction, next to FedAvg's for the same rounds
    with its models in the format ``wire``."""
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
            f"FedAvg for the same {rounds} rounds in {wire}: {_mb(fedavg_bytes)} "
            f"(training traffic here is {train / fedavg_bytes:.4f} of it)"
        )
    return "\n".join(lines)


@dataclass
class RunOutput(RunFolder):
    """The folder and results of one run through Flower (:class:`wash_fed.results.RunFolder`),
    written from the round loop and from Flower's exit handlers alike: nothing is written
    once the run was recorded ``stopped``."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopped: bool = False

    @classmethod
    def open(cls, cfg: WashFedConfig, run_id: int, ledger: Ledger) -> RunOutput:
        """``<output-dir>/<time>-<label>-<run id>``, with its ``results.json``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        directory = (Path(cfg.output.output_dir) / f"{stamp}-{cfg.label}-{run_id}").resolve()
        result = RunResult("flower", cfg.label, cfg, run_id=run_id)
        out = cls.create(directory, result, ledger)
        assert isinstance(out, RunOutput)
        return out

    def add_round(self, row: RoundResult) -> None:
        """A finished round's row, with ``elapsed``: seconds since this process started the
        run (a resumed run counts from its resumption)."""
        elapsed = time.perf_counter() - self.started
        self.result.rounds.append(dataclasses.replace(row, elapsed=elapsed))
        self.write()

    def add_exchange(self, row: ExchangeResult) -> None:
        """A message round outside training, with ``elapsed`` as :meth:`add_round`'s."""
        elapsed = time.perf_counter() - self.started
        self.result.exchanges.append(dataclasses.replace(row, elapsed=elapsed))
        self.write()

    def write(self) -> None:
        """Rewrite ``results.json`` and ``ledger.csv``; nothing more once the run was
        stopped."""
        with self._lock:
            if not self._stopped:
                super().write()

    def save_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Write the server's checkpoint beside the results; whether it was written (not
        once the run was stopped)."""
        with self._lock:
            if self._stopped:
                return False
            checkpoint.save(self.directory)
            return True

    def record_members(self, nodes: Mapping[int, int]) -> None:
        """The node of each member (partition id), written when it changed."""
        members = {str(p): n for p, n in sorted(nodes.items())}
        if members != self.result.members:
            self.result.members = members
            self.write()

    def keep(
        self, model: Mapping[str, Tensor], members: Mapping[int, Mapping[str, Tensor]]
    ) -> None:
        """The final model into ``final_model.pt`` and, with ``save-members``, every
        collected member's into ``members.pt`` (:data:`wash_fed.strategy.final.FinalModel`)."""
        self.save_model(model)
        if self.result.config.output.save_members:
            flat = {f"{p}.{k}": v for p, state in members.items() for k, v in state.items()}
            self.save_model(flat, "members.pt")

    def finish(self, final: FinalResult, fedavg_bytes: int | None) -> None:
        self.result.status, self.result.final = "completed", final
        self.result.fedavg_bytes = fedavg_bytes
        self.write()
        log(INFO, "")
        log(INFO, "Bytes sent (payload as Flower serializes it):")
        cfg = self.result.config
        table = ledger_table(
            self.ledger, fedavg_bytes, cfg.num_server_rounds, fedavg_format(cfg).name
        )
        for line in table.splitlines():
            log(INFO, "  %s", line)
        if (self.directory / "final_model.pt").exists():
            log(INFO, "Final model: %s", self.directory / "final_model.pt")
        log(INFO, "Results:     %s", self.directory / "results.json")

    def stop(self) -> None:
        """The run was stopped (``flwr stop``, a signal): a run still running is recorded
        ``stopped`` and nothing is written after that. Called from Flower's exit handlers,
        which also run at every normal exit, when it does nothing."""
        with self._lock:
            if self._stopped or self.result.status != "running":
                return
            self._stopped = True
            self.result.status = "stopped"
            try:
                super().write()
            except OSError as err:
                log(ERROR, "Run stopped; could not record it in %s: %s", self.directory, err)
                return
        log(INFO, "Run stopped; results so far are in %s", self.directory)

    def fail(self, error: BaseException) -> None:
        """Record the run as failed with ``error``. When even that cannot be written (the
        disk that failed the run), the log says so and the error goes on unrecorded here:
        Flower's status for the run says ``failed`` with the same reason."""
        reason = f"{type(error).__name__}: {error}"
        self.result.status, self.result.error = "failed", reason
        try:
            self.write()
        except OSError as err:
            log(
                ERROR, "Run failed (%s); could not record it in %s: %s", reason, self.directory, err
            )
            return
        log(INFO, "Run failed; results so far are in %s", self.directory)


def round_row(
    cfg: WashFedConfig,
    ledger: Ledger,
    report: RoundReport,
    fedavg_bytes: int | None,
    time: RoundTime,
) -> RoundResult:
    """One round's figures for ``results.json`` (with where its time went); logs the
    progress line."""
    this_round = ledger.by_round().get(report.round, {"up": 0, "down": 0})
    means = report.member_means()
    row = RoundResult(
        round=report.round,
        seconds=report.seconds,
        bytes_up=this_round["up"],
        bytes_down=this_round["down"],
        bytes_total=ledger.total(),
        members={str(k): dict(v) for k, v in sorted(report.metrics.items())},
        loss=means.get(Metric.LOSS),
        train_accuracy=means.get(Metric.TRAIN_ACCURACY),
        test_accuracy=means.get(Metric.TEST_ACCURACY),
        failed={str(k): v for k, v in report.failed.items()},
        rejected={str(k): v for k, v in report.rejected.items()},
        exchange=report.exchange,
        exchange_digest=report.exchange_digest,
        time=time,
    )
    log(INFO, "%s", progress_line(cfg, row, fedavg_bytes))
    return row


def progress_line(cfg: WashFedConfig, row: RoundResult, fedavg_bytes: int | None) -> str:
    """A round's line in the run's log: members, their figures, bytes, and time."""
    text = f"[{cfg.label}] round {row.round}/{cfg.num_server_rounds}: "
    text += f"{row.answered}/{cfg.num_members} members"
    if row.loss is not None and row.train_accuracy is not None:
        text += f", loss {row.loss:.4f}, train acc {row.train_accuracy:.4f}"
    if row.test_accuracy is not None:
        text += f", test acc {row.test_accuracy:.4f}"
    sent = (row.bytes_up + row.bytes_down) / 1e6
    text += f" | sent {sent:.3f} MB, {row.bytes_total / 1e6:.3f} MB so far"
    if fedavg_bytes:
        so_far = fedavg_bytes * row.round / cfg.num_server_rounds
        text += f" (FedAvg: {so_far / 1e6:.3f} MB)"
    if row.time is not None:
        text += f" | {time_text(row.seconds, row.time)}"
    return text


def time_text(seconds: float, time: RoundTime) -> str:
    """``8.52 s (compute 4.10, slot 4.21, delivery 0.15, server 0.06)``: parts that are 0
    left out."""
    parts = ", ".join(f"{part} {sec:.2f}" for part, sec in time.as_dict().items() if sec)
    return f"{seconds:.2f} s ({parts})"
