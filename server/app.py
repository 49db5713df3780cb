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

from logging import INFO
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    Context,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from server.checkpoint import ServerCheckpoint
from server.fedavg import run_fedavg
from server.flower_log import STRATEGY_LOG, flower_strategy_log_to
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData, load_local
from wash_fed.evaluation import Evaluator, OnData
from wash_fed.keys import RESULTS_IN, Split
from wash_fed.ledger import Ledger
from wash_fed.protocol import wire_format
from wash_fed.results import ResumedFrom
from wash_fed.strategy.final import FinalExchanges, OnMembers, ServerEvaluation
from wash_fed.strategy.ledger_grid import LedgerGrid
from wash_fed.strategy.record import RunRecord
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
    record = open_record(cfg, grid.run.run_id, resumed)
    with record, flower_strategy_log_to(record.output.directory / STRATEGY_LOG):
        # Failed or stopped, the record says so; members' workers end after their idle
        # timeout where the run could not tell them it ended.
        run_strategy(record.grid(grid), cfg, record, resumed)


def open_record(cfg: WashFedConfig, run_id: int, resumed: ServerCheckpoint | None) -> RunRecord:
    """The run's folder and metrics (carrying over a resumed run's rows and ledger),
    announced in the log; recorded ``stopped`` when Flower ends the ServerApp early."""
    record = RunRecord.open(cfg, run_id, Ledger(resumed.ledger if resumed else ()))
    output = record.output
    log(
        INFO,
        "wash-fed %s: %d members, %d rounds x %d local steps, %s on the wire; " + RESULTS_IN + "%s",
        cfg.label,
        cfg.num_members,
        cfg.num_server_rounds,
        cfg.optim.local_steps,
        wire_format(cfg).name,
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
    return record


def run_strategy(
    grid: LedgerGrid, cfg: WashFedConfig, record: RunRecord, resumed: ServerCheckpoint | None
) -> None:
    """The configured strategy to its end, recorded as it goes."""
    test = load_test_data(cfg) if cfg.data.test_on_server else None
    if cfg.strategy != "fedavg":
        run_population_strategy(grid, cfg, test, record, resumed)
        return
    roster = Roster(cfg, new_model(cfg).state_dict(), on_bind=grid.bind)
    with roster.ending(grid):
        roster.connect(grid)
        record.output.record_members(roster.nodes)
        evaluator: Evaluator = (
            OnData(test, cfg.final.eval_batch_size, lambda: new_model(cfg))
            if test is not None
            else OnMembers(FinalExchanges(grid, roster, cfg), Split.TEST)
        )
        final = run_fedavg(grid, cfg, roster, evaluator.accuracy, record)
    record.finish(final, None)


def run_population_strategy(
    grid: LedgerGrid,
    cfg: WashFedConfig,
    test: ImageData | None,
    record: RunRecord,
    resumed: ServerCheckpoint | None,
) -> None:
    """WASH, PAPA or independent members through :class:`wash_fed.strategy.Wash` (from
    where ``resumed`` left the run, when given), with the server's checkpoint after every
    round."""
    output = record.output

    def save_checkpoint(report: RoundReport) -> None:
        checkpoint = ServerCheckpoint(
            config=cfg.to_mapping(),
            run_id=grid.run.run_id,
            earlier_runs=resumed.chain if resumed else [],
            round=report.round,
            state=strategy.rounds.state,
            ledger=grid.ledger.entries,
            rows=output.result.rounds,
            credentials=strategy.rounds.roster.credentials,
        )
        if output.save_checkpoint(checkpoint):
            strategy.rounds.state.checkpointed = report.round

    strategy = Wash(
        cfg,
        evaluation=server_evaluation(cfg, test),
        keep=output.keep,
        on_round=save_checkpoint,
        record=record,
        continuation=resumed.continuation if resumed else None,
    )
    strategy.start(grid, ArrayRecord(new_model(cfg).state_dict()))


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
