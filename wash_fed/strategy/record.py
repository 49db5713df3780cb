"""What a run leaves behind, for any ServerApp: its folder and its Prometheus metrics, fed
the same way by :class:`~wash_fed.strategy.Wash` and by the built-in app's FedAvg (a
boundary module: it imports Flower and prometheus_client)::

    with RunRecord.open(cfg, grid.run.run_id) as record:
        result = Wash(cfg, record=record).start(grid, initial_arrays)

The folder is ``<output-dir>/<time>-<label>-<run id>``: ``results.json`` (the configuration,
a row per round, the final figures, the bytes; rewritten after every round, so a run that
fails keeps what it had, and its ``status`` says how the run ended) and ``ledger.csv``
(every message). The metrics (:mod:`wash_fed.strategy.metrics`) are served on
``metrics-port`` while the run lasts, and ``metrics-grace`` seconds after it, and pushed to
``metrics-pushgateway`` at its end.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from types import TracebackType

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.keys import Config, MessageType, Metric, Record, Reply
from wash_fed.ledger import Ledger
from wash_fed.protocol import fedavg_format
from wash_fed.results import GLOBAL_MODEL, ExchangeResult, FinalResult, fedavg_equivalent_bytes
from wash_fed.strategy.ledger_grid import LedgerGrid
from wash_fed.strategy.metrics import RunMetrics
from wash_fed.strategy.report import RunOutput, round_row, time_text
from wash_fed.strategy.state import RoundReport
from wash_fed.timing import RoundTime, split_round

__all__ = ["RunRecord", "fedavg_bytes_through_flower"]


@dataclass
class RunRecord:
    """A run's folder (:class:`~wash_fed.strategy.report.RunOutput`) and its metrics
    (:class:`~wash_fed.strategy.metrics.RunMetrics`), kept in step. As a context manager it
    records how the run ended -- ``failed`` with the error, ``stopped`` when interrupted --
    and publishes the final metrics."""

    output: RunOutput
    metrics: RunMetrics

    @classmethod
    def open(cls, cfg: WashFedConfig, run_id: int, ledger: Ledger | None = None) -> RunRecord:
        """A new run's folder (status ``running``), and its metrics, served on
        ``cfg.output.metrics_port`` when that is set. ``ledger``: one that already holds
        entries (a resumed run's)."""
        output = RunOutput.open(cfg, run_id, ledger if ledger is not None else Ledger())
        metrics = RunMetrics(cfg.label)
        if cfg.output.metrics_port:
            try:
                metrics.serve(cfg.output.metrics_port)
            except OSError as err:  # a busy port: the run fails, and says so
                output.fail(err)
                raise
            log(INFO, "Prometheus metrics on port %d", cfg.output.metrics_port)
        return cls(output, metrics)

    @property
    def cfg(self) -> WashFedConfig:
        return self.output.result.config

    @property
    def ledger(self) -> Ledger:
        return self.output.ledger

    def grid(self, grid: Grid) -> LedgerGrid:
        """``grid`` counting every byte into this record's ledger and metrics."""
        return LedgerGrid.for_run(grid, self.ledger, self.cfg.runtime, self._exchanged)

    def _exchanged(self, round_: int, phase: str, time: RoundTime | None) -> None:
        """An exchange happened: the metrics catch up with the ledger; one outside training
        goes into the results with where its time went."""
        self.metrics.sync_ledger(self.ledger)
        if time is not None:
            seconds = sum(time.as_dict().values())
            log(INFO, "[%s] %s: %s", self.cfg.label, phase, time_text(seconds, time))
            up, down = (self.ledger.total(d, phase, round_) for d in ("up", "down"))
            row = ExchangeResult(phase, round_, seconds, up, down, time)
            self.output.add_exchange(row)

    def round(self, grid: LedgerGrid, report: RoundReport, fedavg_bytes: int | None) -> None:
        """A finished round into the results (logging its progress line) and the metrics,
        with where its time went. ``fedavg_bytes``: what FedAvg would send over the whole
        run (None for FedAvg itself)."""
        flights = grid.take_in_flight(report.round)
        time = split_round(report.seconds, flights, report.metrics, simulated=grid.simulated)
        cfg = self.cfg
        self.output.add_round(round_row(cfg, grid.ledger, report, fedavg_bytes, time))
        if fedavg_bytes is None:  # FedAvg itself: what it would have sent is what it sent
            per_round = sum(grid.ledger.by_round().get(report.round, {}).values())
        else:
            per_round = fedavg_bytes // cfg.num_server_rounds
        self.metrics.observe_round(report, per_round, time)

    def finish(self, final: FinalResult, fedavg_bytes: int | None) -> None:
        """The run completed: its final figures into the results and the metrics, the bytes
        by phase into the log."""
        if final.final_model == GLOBAL_MODEL:
            observed = {GLOBAL_MODEL: final.final_accuracy}
        else:
            observed = {"member_mean": final.member_mean or 0.0, "soup": final.final_accuracy}
            if final.ensemble is not None:
                observed["ensemble"] = final.ensemble
        self.metrics.observe_final(observed)
        self.output.finish(final, fedavg_bytes)

    def publish(self) -> None:
        """Bring the metrics up to date with the ledger, push them if asked, and keep
        serving them for ``metrics-grace`` seconds so that the final values are scraped."""
        cfg, run_id = self.cfg, self.output.result.run_id
        self.metrics.sync_ledger(self.ledger)
        if cfg.output.metrics_pushgateway:
            try:
                self.metrics.push(
                    cfg.output.metrics_pushgateway, job=f"wash-fed-{cfg.label}-{run_id}"
                )
            except OSError as err:  # the run's results are on disk; say so and carry on
                gateway = cfg.output.metrics_pushgateway
                log(WARNING, "could not push metrics to %s: %s", gateway, err)
        if cfg.output.metrics_port and cfg.output.metrics_grace:
            log(INFO, "serving final metrics for %.0f s", cfg.output.metrics_grace)
            time.sleep(cfg.output.metrics_grace)

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if isinstance(error, (SystemExit, KeyboardInterrupt)):
                self.output.stop()  # the run can send nothing more
            elif error is not None:
                self.output.fail(error)
        finally:
            self.publish()


def fedavg_bytes_through_flower(
    cfg: WashFedConfig, state_dict: Mapping[str, Tensor], nodes: Collection[int]
) -> int:
    """What FedAvg would send over the same rounds: each round the full model
    (``state_dict`` in FedAvg's format for this ``wire-dtype``: :func:`fedavg_format`) to
    every member and back, measured as Flower serializes those messages."""
    state = wire.tensors_to_record(fedavg_format(cfg).encode(state_dict))
    node = next(iter(nodes))
    down = wire.message(
        node, MessageType.TRAIN, 1, {Config.REPLY: Reply.STATE}, {Record.ARRAYS: state}
    )
    metrics = MetricRecord(
        {
            Metric.PARTITION_ID: 0,
            Metric.LOSS: 0.0,
            Metric.TRAIN_ACCURACY: 0.0,
            Metric.NUM_EXAMPLES: 0,
            Metric.STEPS: 0,
            Metric.EPOCHS: 0.0,
        }
    )
    up = Message(
        RecordDict({Record.ARRAYS: state, Record.METRICS: metrics}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    return fedavg_equivalent_bytes(
        cfg.num_server_rounds, len(nodes), wire.message_bytes(down), wire.message_bytes(up)
    )
