"""The wash-fed ServerApp.

Reads the run configuration once (every problem is an error before any training), waits for
``num-members`` SuperNodes, checks each member's data and mask derivation (``query.hello``,
:mod:`server.roster`), then runs the configured strategy through Flower's ``Strategy.start``:

* ``wash``, ``papa``, ``papa-all``, ``ensemble`` (:mod:`server.strategies` on the member
  protocol of :mod:`wash_fed.protocol`), followed by the final step (:mod:`server.final`);
* ``fedavg``: Flower's own ``FedAvg``, unchanged, on the same model, data and rounds.

Whatever happens, the members are told that the run ended (``query.end``), so that their
workers exit: in the final step's last message (which also carries the final model for
their evaluation), or after the run.

Every message goes through a :class:`server.ledger_grid.LedgerGrid`, so every strategy's
bytes are counted the same way. Results land in ``<output-dir>/<time>-<strategy>-<run id>``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    Context,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler
from torch import Tensor

from server.checkpoint import ServerCheckpoint
from server.fedavg import fedavg_bytes_through_flower, run_fedavg
from server.final import FinalExchanges, OnMembers, ServerEvaluation, final_step
from server.flower_log import STRATEGY_LOG, flower_strategy_log_to
from server.ledger_grid import LedgerGrid
from server.metrics import RunMetrics
from server.report import RunOutput, record_round
from server.roster import Roster
from server.state import RoundReport
from server.strategies import PopulationStrategy
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData, load_local
from wash_fed.evaluation import Evaluator, OnData
from wash_fed.keys import RESULTS_IN, Split
from wash_fed.ledger import Ledger
from wash_fed.models import model_layout
from wash_fed.protocol import server_protocol
from wash_fed.results import FinalResult, ResumedFrom
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
    roster: Roster | None = None
    try:
        if cfg.output.metrics_port:
            metrics.serve(cfg.output.metrics_port)
            log(INFO, "Prometheus metrics on port %d", cfg.output.metrics_port)
        model = new_model(cfg)
        parameters = dict(model.named_parameters())
        numels = [p.numel() for p in parameters.values()]
        digest = cfg.shuffle_mask(numels, 1).digest()
        roster = Roster(cfg, digest, model_layout(model), on_bind=ledger_grid.bind)
        if resumed is not None:
            roster.continues = (resumed.run_id, resumed.round)
            roster.credentials = dict(resumed.credentials)
        roster.connect(ledger_grid)
        output.result.members = {str(p): n for p, n in roster.nodes.items()}
        output.write()
        with flower_strategy_log_to(output.directory / STRATEGY_LOG):
            final, fedavg_bytes = run_strategy(
                ledger_grid, cfg, roster, parameters, output, metrics, resumed
            )
        roster.end(ledger_grid, completed=True, earlier_runs=resumed.chain if resumed else [])
        output.finish(final, fedavg_bytes)
    except (SystemExit, KeyboardInterrupt):
        # Stopped: the run can send nothing more; members' workers end after their idle
        # timeout.
        output.stop()
        raise
    except BaseException as err:
        if roster is not None:  # their workers exit now; their checkpoints stay
            with contextlib.suppress(Exception):
                roster.end(ledger_grid, completed=False)
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
    roster: Roster,
    parameters: Mapping[str, Tensor],
    output: RunOutput,
    metrics: RunMetrics,
    resumed: ServerCheckpoint | None,
) -> tuple[FinalResult, int | None]:
    """The configured strategy to its end: the final figures, and what FedAvg would have
    sent (None for FedAvg itself)."""
    test = load_test_data(cfg) if cfg.data.test_on_server else None
    if cfg.strategy != "fedavg":
        return run_population_strategy(
            grid, cfg, roster, parameters, test, output, metrics, resumed
        )
    evaluator: Evaluator = (
        OnData(test, cfg.final.eval_batch_size, lambda: new_model(cfg))
        if test is not None
        else OnMembers(FinalExchanges(grid, roster, cfg), Split.TEST)
    )
    return run_fedavg(grid, cfg, roster, evaluator.accuracy, output, metrics), None


def run_population_strategy(
    grid: LedgerGrid,
    cfg: WashFedConfig,
    roster: Roster,
    parameters: Mapping[str, Tensor],
    test: ImageData | None,
    output: RunOutput,
    metrics: RunMetrics,
    resumed: ServerCheckpoint | None,
) -> tuple[FinalResult, int]:
    """WASH, PAPA or independent members through Flower (from where ``resumed`` left the
    run, when given), then the final step. Returns the final figures and what FedAvg would
    have sent."""
    fedavg_bytes = fedavg_bytes_through_flower(cfg, roster.nodes.values())

    def on_round(report: RoundReport) -> None:
        record_round(output, grid, metrics, report, fedavg_bytes)
        checkpoint = ServerCheckpoint(
            config=cfg.to_mapping(),
            run_id=grid.run.run_id,
            earlier_runs=resumed.chain if resumed else [],
            round=report.round,
            state=strategy.state,
            ledger=grid.ledger.entries,
            rows=output.result.rounds,
            credentials=roster.credentials,
        )
        if output.save_checkpoint(checkpoint):
            strategy.state.checkpointed = report.round

    protocol = server_protocol(cfg, roster.nodes, parameters)
    strategy = PopulationStrategy(cfg, roster, protocol, on_round)
    if resumed is not None:
        strategy.continue_from(resumed.state.resumed_at(resumed.round))
    done = strategy.state.rounds_done
    if done < cfg.num_server_rounds:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            num_rounds=cfg.num_server_rounds - done,
            timeout=cfg.runtime.round_timeout,
        )
    if not any(report.metrics for report in strategy.state.history):
        why = strategy.state.reasons()
        reasons = "; ".join(f"member {p}: {reason}" for p, reason in sorted(why.items()))
        raise RuntimeError(f"no member completed a single round ({reasons or 'no round ran'})")
    earlier_runs = resumed.chain if resumed else []
    reference = new_model(cfg).state_dict()
    final = final_step(
        grid, strategy, reference, server_evaluation(cfg, test), output.keep, earlier_runs
    )
    observed = {"member_mean": final.member_mean or 0.0, "soup": final.final_accuracy}
    if final.ensemble is not None:
        observed["ensemble"] = final.ensemble
    metrics.observe_final(observed)
    return final, fedavg_bytes


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
