"""The wash-fed ServerApp.

Reads the run configuration once (every problem is an error before any training), waits for
``num-members`` SuperNodes, checks each member's data and mask derivation (``query.hello``,
:mod:`wash_fed.strategy.roster`), then runs the configured strategy through Flower's
``Strategy.start``:

* ``wash``, ``papa``, ``papa-all``, ``ensemble`` (:mod:`wash_fed.strategy.rounds` on the
  member protocol of :mod:`wash_fed.protocol`), followed by the final step
  (:mod:`wash_fed.strategy.final`);
* ``fedavg``: Flower's own ``FedAvg``, unchanged, on the same model, data and rounds.

Whatever happens, the members are told that the run ended (``query.end``), so that their
workers exit: in the final step's last message (which also carries the final model for
their evaluation), or after the run.

Every message goes through a :class:`wash_fed.strategy.ledger_grid.LedgerGrid`, so every strategy's
bytes are counted the same way. Results land in ``<output-dir>/<time>-<strategy>-<run id>``.
"""

from __future__ import annotations

import functools
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    Context,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from server.checkpoint import ServerCheckpoint
from server.fedavg import fedavg_bytes_through_flower, run_fedavg
from server.flower_log import STRATEGY_LOG, flower_strategy_log_to
from server.metrics import RunMetrics
from server.report import RunOutput, record_round
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData, load_local
from wash_fed.evaluation import Evaluator, OnData
from wash_fed.keys import RESULTS_IN, Split
from wash_fed.ledger import Ledger
from wash_fed.results import FinalResult, ResumedFrom
from wash_fed.strategy.final import FinalExchanges, OnMembers, ServerEvaluation
from wash_fed.strategy.ledger_grid import LedgerGrid
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.state import RoundReport
from wash_fed.strategy.wash import Wash
from wash_fed.training import configure_torch, load_test_data, new_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = WashFedConfig.from_mapping(context.run_config)
    configure_torch(cfg)  # deterministic: the server's evaluations and merges too
    resumed = (
        ServerCheckpoint.load(Path(cfg.runtime.resume_from), cfg)
        if cfg.runtime.resume_from
        else None
    )
    ledger = Ledger(resumed.ledger if resumed else ())
    output = open_output(cfg, grid.run.run_id, ledger, resumed)
    metrics = RunMetrics(cfg.label)
    ledger_grid = LedgerGrid(
        grid,
        ledger,
        on_exchange=lambda *_: metrics.sync_ledger(ledger),
        poll_interval=cfg.runtime.poll_interval,
    )
    try:
        if cfg.output.metrics_port:
            metrics.serve(cfg.output.metrics_port)
            log(INFO, "Prometheus metrics on port %d", cfg.output.metrics_port)
        with flower_strategy_log_to(output.directory / STRATEGY_LOG):
            final, fedavg_bytes = run_strategy(ledger_grid, cfg, output, metrics, resumed)
        output.finish(final, fedavg_bytes)
    except (SystemExit, KeyboardInterrupt):
        # Stopped: the run can send nothing more; members' workers end after their idle
        # timeout.
        output.stop()
        raise
    except BaseException as err:  # the members were told; their checkpoints stay
        output.fail(err)
        raise
    finally:
        publish_metrics(cfg, metrics, ledger, grid.run.run_id)


def open_output(
    cfg: WashFedConfig, run_id: int, ledger: Ledger, resumed: ServerCheckpoint | None
) -> RunOutput:
    """The run's folder and results (carrying over a resumed run's rows), announced in the
    log; recorded ``stopped`` when Flower ends the ServerApp early."""
    output = RunOutput.open(cfg, run_id, ledger)
    log(
        INFO,
        "wash-fed %s: %d members, %d rounds x %d local steps; " + RESULTS_IN + "%s",
        cfg.label,
        cfg.num_members,
        cfg.num_server_rounds,
        cfg.optim.local_steps,
        output.directory,
    )
    # `flwr stop` (or a signal) ends the ServerApp through Flower's exit handlers: in a
    # deployment by exiting its main thread, in simulation by exiting the process around it.
    add_exit_handler(output.stop, run_before_force_exit=True)
    if resumed is not None:
        log(INFO, "continuing %s after round %d", cfg.runtime.resume_from, resumed.round)
        output.result.rounds = list(resumed.rows)
        output.result.resumed_from = ResumedFrom(
            cfg.runtime.resume_from, resumed.run_id, resumed.round
        )
        output.write()
    return output


def run_strategy(
    grid: LedgerGrid,
    cfg: WashFedConfig,
    output: RunOutput,
    metrics: RunMetrics,
    resumed: ServerCheckpoint | None,
) -> tuple[FinalResult, int | None]:
    """The configured strategy to its end: the final figures, and what FedAvg would have
    sent (None for FedAvg itself)."""
    test = load_test_data(cfg) if cfg.data.test_on_server else None
    if cfg.strategy != "fedavg":
        return run_population_strategy(grid, cfg, test, output, metrics, resumed)
    roster = Roster(cfg, new_model(cfg).state_dict(), on_bind=grid.bind)
    with roster.ending(grid):
        roster.connect(grid)
        output.record_members(roster.nodes)
        evaluator: Evaluator = (
            OnData(test, cfg.final.eval_batch_size, lambda: new_model(cfg))
            if test is not None
            else OnMembers(FinalExchanges(grid, roster, cfg), Split.TEST)
        )
        return run_fedavg(grid, cfg, roster, evaluator.accuracy, output, metrics), None


def run_population_strategy(
    grid: LedgerGrid,
    cfg: WashFedConfig,
    test: ImageData | None,
    output: RunOutput,
    metrics: RunMetrics,
    resumed: ServerCheckpoint | None,
) -> tuple[FinalResult, int]:
    """WASH, PAPA or independent members through :class:`wash_fed.strategy.Wash` (from
    where ``resumed`` left the run, when given). Returns the final figures and what FedAvg
    would have sent."""

    @functools.cache
    def fedavg_bytes() -> int:
        return fedavg_bytes_through_flower(cfg, strategy.rounds.roster.nodes.values())

    def on_round(report: RoundReport) -> None:
        roster = strategy.rounds.roster
        output.record_members(roster.nodes)
        record_round(output, grid, metrics, report, fedavg_bytes())
        checkpoint = ServerCheckpoint(
            config=cfg.to_mapping(),
            run_id=grid.run.run_id,
            earlier_runs=resumed.chain if resumed else [],
            round=report.round,
            state=strategy.rounds.state,
            ledger=grid.ledger.entries,
            rows=output.result.rounds,
            credentials=roster.credentials,
        )
        if output.save_checkpoint(checkpoint):
            strategy.rounds.state.checkpointed = report.round

    strategy = Wash(
        cfg,
        evaluation=server_evaluation(cfg, test),
        keep=output.keep,
        on_round=on_round,
        continuation=resumed.continuation if resumed else None,
    )
    strategy.start(grid, ArrayRecord(new_model(cfg).state_dict()))
    final = strategy.final
    assert final is not None  # start() returns once the final step ran
    observed = {"member_mean": final.member_mean or 0.0, "soup": final.final_accuracy}
    if final.ensemble is not None:
        observed["ensemble"] = final.ensemble
    metrics.observe_final(observed)
    return final, fedavg_bytes()


def server_evaluation(cfg: WashFedConfig, test: ImageData | None) -> ServerEvaluation:
    """What the server evaluates the final step with: its test set (``test-on-server``),
    and its held-out data for the greedy soup (``validation-path``), where it has them."""
    batch_size, build = cfg.final.eval_batch_size, lambda: new_model(cfg)
    held_out = cfg.data.validation_path
    validation = load_local(held_out, cfg.data.task) if held_out else None
    return ServerEvaluation(
        OnData(test, batch_size, build) if test is not None else None,
        OnData(validation, batch_size, build).accuracy if validation is not None else None,
    )


def publish_metrics(cfg: WashFedConfig, metrics: RunMetrics, ledger: Ledger, run_id: int) -> None:
    """Bring the metrics up to date with the ledger, push them if asked, and keep serving
    them for ``metrics-grace`` seconds so that the final values are scraped."""
    metrics.sync_ledger(ledger)
    if cfg.output.metrics_pushgateway:
        try:
            metrics.push(cfg.output.metrics_pushgateway, job=f"wash-fed-{cfg.label}-{run_id}")
        except OSError as err:  # the run's results are on disk; say so and carry on
            log(WARNING, "could not push metrics to %s: %s", cfg.output.metrics_pushgateway, err)
    if cfg.output.metrics_port and cfg.output.metrics_grace:
        log(INFO, "serving final metrics for %.0f s", cfg.output.metrics_grace)
        time.sleep(cfg.output.metrics_grace)
