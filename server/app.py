"""The wash-fed ServerApp.

Reads the run configuration once (every problem is an error before any training), waits for
``num-members`` SuperNodes, checks each member's data and mask derivation (``query.hello``,
:mod:`server.roster`), then runs the configured strategy through Flower's ``Strategy.start``:

* ``wash``, ``papa``, ``papa-all``, ``ensemble`` (:mod:`server.strategies` on the member
  protocol of :mod:`wash_fed.protocol`), followed by the final step (:mod:`server.final`);
* ``fedavg``: Flower's own ``FedAvg``, unchanged, on the same model, data and rounds.

Whatever happens, the members are told that the run ended (``query.end``), so that their
workers exit.

Every message goes through a :class:`server.ledger_grid.LedgerGrid`, so every strategy's
bytes are counted the same way. Results land in ``<output-dir>/<time>-<strategy>-<run id>``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection
from logging import INFO, WARNING
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from torch import nn

from server.final import OnMembers, final_step
from server.ledger_grid import LedgerGrid
from server.report import RunOutput
from server.roster import Roster
from server.strategies import PopulationStrategy, RoundReport
from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData, load_local
from wash_fed.evaluation import Evaluator, OnData
from wash_fed.keys import Config, MessageType, Metric, Record, Reply, Split
from wash_fed.ledger import Ledger
from wash_fed.metrics import RunMetrics
from wash_fed.protocol import server_protocol
from wash_fed.training import initial_model, load_test_data, new_model, wash_mask

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = WashFedConfig.from_mapping(context.run_config)
    ledger = Ledger()
    output = RunOutput.create(cfg, grid.run.run_id, ledger)
    log(
        INFO,
        "wash-fed %s: %d members, %d rounds x %d local steps; results in %s",
        cfg.label,
        cfg.num_members,
        cfg.num_server_rounds,
        cfg.local_steps,
        output.directory,
    )
    metrics = RunMetrics(cfg.label)
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port)
        log(INFO, "Prometheus metrics on port %d", cfg.metrics_port)
    ledger_grid = LedgerGrid(
        grid,
        ledger,
        on_exchange=lambda *_: metrics.sync_ledger(ledger),
        poll_interval=cfg.poll_interval,
    )
    roster: Roster | None = None
    try:
        test = load_test_data(cfg) if cfg.test_on_server else None
        numels = [p.numel() for p in new_model(cfg).parameters()]
        roster = Roster(cfg, wash_mask(cfg, numels, 1).digest())
        roster.connect(ledger_grid)
        output.write(members={str(p): n for p, n in roster.nodes.items()})
        if cfg.strategy == "fedavg":
            evaluator: Evaluator = (
                OnData(test, cfg.eval_batch_size)
                if test is not None
                else OnMembers(ledger_grid, list(roster.nodes.values()), cfg, Split.TEST)
            )
            final = run_fedavg(ledger_grid, cfg, evaluator.accuracy, output, metrics)
            fedavg_bytes = None
        else:
            final, fedavg_bytes = run_population(
                ledger_grid, cfg, roster, numels, test, output, metrics
            )
        roster.end(ledger_grid)
        output.finish(final, fedavg_bytes)
    except BaseException as err:
        if roster is not None:  # their workers exit now, not after an idle timeout
            with contextlib.suppress(Exception):
                roster.end(ledger_grid)
        output.fail(err)
        raise
    finally:
        publish_metrics(cfg, metrics, ledger, grid.run.run_id)


def run_population(
    grid: LedgerGrid,
    cfg: WashFedConfig,
    roster: Roster,
    numels: list[int],
    test: ImageData | None,
    output: RunOutput,
    metrics: RunMetrics,
) -> tuple[dict[str, Any], int]:
    """WASH, PAPA or independent members through Flower, then the final step. Returns the
    final figures and what FedAvg would have sent."""
    fedavg_bytes = fedavg_equivalent_bytes(cfg, roster.nodes.values())

    def on_round(report: RoundReport) -> None:
        output.add_round(round_row(cfg, grid.ledger, report, fedavg_bytes))
        metrics.observe_round(report, fedavg_bytes // cfg.num_server_rounds)

    protocol = server_protocol(cfg, roster.nodes, numels)
    strategy = PopulationStrategy(cfg, roster, protocol, on_round)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
    )
    validation = load_local(cfg.validation_path, cfg.dataset) if cfg.validation_path else None
    final = final_step(grid, cfg, strategy, test, validation, output)
    observed = {"member_mean": final["member_mean"], "soup": final["final_accuracy"]}
    if final["ensemble"] is not None:
        observed["ensemble"] = final["ensemble"]
    metrics.observe_final(observed)
    return final, fedavg_bytes


def publish_metrics(cfg: WashFedConfig, metrics: RunMetrics, ledger: Ledger, run_id: int) -> None:
    """Bring the metrics up to date with the ledger, push them if asked, and keep serving
    them for ``metrics-grace`` seconds so that the final values are scraped."""
    metrics.sync_ledger(ledger)
    if cfg.metrics_pushgateway:
        try:
            metrics.push(cfg.metrics_pushgateway, job=f"wash-fed-{cfg.label}-{run_id}")
        except OSError as err:  # the run's results are on disk; say so and carry on
            log(WARNING, "could not push metrics to %s: %s", cfg.metrics_pushgateway, err)
    if cfg.metrics_port and cfg.metrics_grace:
        log(INFO, "serving final metrics for %.0f s", cfg.metrics_grace)
        time.sleep(cfg.metrics_grace)


def round_row(
    cfg: WashFedConfig, ledger: Ledger, report: RoundReport, fedavg_bytes: int | None
) -> dict[str, Any]:
    """One round's figures for ``results.json``; logs the progress line."""
    this_round = ledger.by_round().get(report.round, {"up": 0, "down": 0})
    means = report.member_means()
    row = {
        "round": report.round,
        "seconds": report.seconds,
        "answered": len(report.metrics),
        "failed": {str(k): v for k, v in report.failed.items()},
        "loss": means.get("loss"),
        "train_accuracy": means.get("train-accuracy"),
        "test_accuracy": means.get("test-accuracy"),
        "members": {str(k): v for k, v in sorted(report.metrics.items())},
        "exchange": report.exchange,
        "exchange_digest": report.exchange_digest,
        "bytes_up": this_round["up"],
        "bytes_down": this_round["down"],
        "bytes_total": ledger.total(),
    }
    text = f"[{cfg.label}] round {report.round}/{cfg.num_server_rounds}: "
    text += f"{len(report.metrics)}/{cfg.num_members} members"
    if row["loss"] is not None:
        text += f", loss {row['loss']:.4f}, train acc {row['train_accuracy']:.4f}"
    if row["test_accuracy"] is not None:
        text += f", test acc {row['test_accuracy']:.4f}"
    sent = (this_round["up"] + this_round["down"]) / 1e6
    text += f" | sent {sent:.3f} MB, {ledger.total() / 1e6:.3f} MB so far"
    if fedavg_bytes:
        so_far = fedavg_bytes * report.round / cfg.num_server_rounds
        text += f" (FedAvg: {so_far / 1e6:.3f} MB)"
    log(INFO, "%s | %.2f s", text, report.seconds)
    return row


def fedavg_equivalent_bytes(cfg: WashFedConfig, nodes: Collection[int]) -> int:
    """What FedAvg would send over the same rounds: each round the full model to every member
    and back, measured as Flower serializes those messages."""
    state = wire.tensors_to_record(new_model(cfg).state_dict())
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
    per_round = wire.message_bytes(down) + wire.message_bytes(up)
    return cfg.num_server_rounds * len(nodes) * per_round


def run_fedavg(
    grid: LedgerGrid,
    cfg: WashFedConfig,
    test_accuracy: Callable[[nn.Module], float],
    output: RunOutput,
    metrics: RunMetrics,
) -> dict[str, Any]:
    """Flower's FedAvg, unchanged: one global model that every member trains each round.

    Per-round figures come through FedAvg's own hooks: ``train_metrics_aggr_fn`` sees the
    members' metrics, ``evaluate_fn`` closes each round (evaluating with ``test_accuracy``,
    on the server's test set or the members').
    """
    started = time.perf_counter()
    round_metrics: list[list[RecordDict]] = []

    def keep_train_metrics(contents: list[RecordDict], weighted_by: str) -> MetricRecord:
        round_metrics.append(contents)
        return aggregate_metricrecords(contents, weighted_by)

    def close_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal started
        if server_round == 0:
            return None
        every = cfg.eval_every
        evaluated: dict[str, float] = {}
        if every > 0 and (server_round % every == 0 or server_round == cfg.num_server_rounds):
            model = new_model(cfg)
            model.load_state_dict(wire.record_to_tensors(arrays))
            evaluated[Metric.TEST_ACCURACY] = test_accuracy(model)
        members = {
            int(wire.metric(c, Metric.PARTITION_ID)): {
                **c.metric_records[Record.METRICS],
                **evaluated,
            }
            for c in round_metrics[server_round - 1]
        }
        report = RoundReport(server_round, members, {}, time.perf_counter() - started, {})
        output.add_round(round_row(cfg, grid.ledger, report, None))
        metrics.observe_round(report, 0)
        started = time.perf_counter()
        return MetricRecord(dict(evaluated)) if evaluated else None

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.num_members,
        min_available_nodes=cfg.num_members,
        train_metrics_aggr_fn=keep_train_metrics,
    )
    # Members read everything else from the run config; "reply" asks for the full state.
    result = strategy.start(
        grid=grid,
        initial_arrays=wire.tensors_to_record(initial_model(cfg, 0).state_dict()),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({Config.REPLY: Reply.STATE}),
        evaluate_fn=close_round,
    )
    model = new_model(cfg)
    model.load_state_dict(wire.record_to_tensors(result.arrays))
    output.save_model(model.state_dict())
    final_accuracy = test_accuracy(model)
    log(INFO, "[fedavg] test accuracy of the global model: %.4f", final_accuracy)
    metrics.observe_final({"global": final_accuracy})
    return {"global_model": final_accuracy, "final_accuracy": final_accuracy}
