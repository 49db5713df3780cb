"""The final step of a population run over Flower: collect the members, build the soups,
recalibrate BatchNorm with the members' own data, evaluate, save the final model.

Evaluation happens on the server's own test set when it has one (``test-on-server``);
otherwise the members evaluate on their own test data (:class:`OnMembers`), and the output
ensemble is not evaluated. Greedy-soup ingredients are picked on a server-side validation
set (``validation-path``) or on the members' held-out images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor, nn

from server.report import RunOutput
from server.strategies import PopulationStrategy
from wash_fed import wire
from wash_fed.batchnorm import BNStatistics, merge_bn_statistics
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData
from wash_fed.evaluation import Evaluator, OnData, PopulationAccuracy
from wash_fed.keys import Config, MessageType, Metric, Record, Split
from wash_fed.merge import merge_population
from wash_fed.training import new_model

__all__ = ["OnMembers", "bn_statistics_from_members", "evaluate_on_members", "final_step"]


def final_step(
    grid: Grid,
    cfg: WashFedConfig,
    strategy: PopulationStrategy,
    test: ImageData | None,
    validation: ImageData | None,
    output: RunOutput,
) -> dict[str, Any]:
    """Collect, merge and evaluate; returns the final figures for ``results.json``.

    ``test``: the server's test set (``None``: the members evaluate). ``validation``: the
    server's held-out data for the greedy soup (``None``: the members' held-out images).
    """
    log(INFO, "final step: collecting %d members", len(strategy.roster.nodes))
    states, reported = strategy.collect(grid, cfg.round_timeout)
    if not states:
        raise RuntimeError("no member could be collected; nothing to average")
    final_round = cfg.num_server_rounds + 1
    nodes = list(strategy.roster.nodes.values())
    exchanges = 0

    def federated_bn_statistics(soup: Mapping[str, Tensor]) -> BNStatistics:
        nonlocal exchanges
        exchanges += 1
        return bn_statistics_from_members(grid, nodes, soup, final_round, cfg)

    evaluator: Evaluator = (
        OnData(test, cfg.eval_batch_size)
        if test is not None
        else OnMembers(grid, nodes, cfg, Split.TEST, _own_accuracies(reported))
    )
    holdout = None
    if cfg.soup == "greedy":
        holdout = (
            OnData(validation, cfg.eval_batch_size).accuracy
            if validation is not None
            else OnMembers(grid, nodes, cfg, Split.HOLDOUT).accuracy
        )
    merge = merge_population(
        list(states.values()),
        lambda: new_model(cfg),
        evaluator,
        bn_statistics_of=federated_bn_statistics if cfg.bn_recalibration else None,
        holdout=holdout,
        final_soup=cfg.soup,
    )
    output.save_model(merge.final_state_dict)
    if cfg.save_members:
        members = {f"{p}.{k}": v for p, sd in states.items() for k, v in sd.items()}
        output.save_model(members, "members.pt")
    own_tests = evaluate_on_members(grid, nodes, merge.final_state_dict, final_round, cfg)
    soups = ", ".join(f"{k} {v:.4f}" for k, v in merge.soups.items())
    ensemble = "-" if merge.ensemble is None else f"{merge.ensemble:.4f}"
    log(
        INFO,
        "[%s] test accuracy: members %.4f (min %.4f), ensemble %s, %s; final: %s",
        cfg.label,
        merge.member_mean,
        min(merge.members),
        ensemble,
        soups,
        merge.final_soup,
    )
    return merge.as_dict() | {
        "collected": sorted(states),
        "bn_exchanges": exchanges,
        "evaluated_on": "server" if test is not None else "members",
        "members_own_evaluation": own_tests,
    }


def _own_accuracies(reported: Mapping[int, Mapping[str, Any]]) -> list[float]:
    """The members' accuracies on their own test data, as their collect replies gave them."""
    own = [float(m[Metric.TEST_ACCURACY]) for m in reported.values() if Metric.TEST_ACCURACY in m]
    if not own:
        raise RuntimeError(
            "test-on-server=false, but no member has test data (test-data-path in its node "
            "config, or the run's test set)"
        )
    return own


@dataclass
class OnMembers:
    """An :class:`~wash_fed.evaluation.Evaluator` over the members' own data (``split``):
    a model's accuracy is the members' accuracies weighted by their examples; each member's
    own accuracy is what it reported (``own``); the ensemble is not evaluated."""

    grid: Grid
    nodes: Sequence[int]
    cfg: WashFedConfig
    split: str
    own: list[float] | None = None

    def population(self, models: Sequence[nn.Module]) -> PopulationAccuracy:
        if self.own is None:
            raise ValueError("the members' own accuracies were not reported")
        return PopulationAccuracy(self.own, None)

    def accuracy(self, model: nn.Module) -> float:
        final_round = self.cfg.num_server_rounds + 1
        config = {Config.SPLIT: self.split}
        replies = _broadcast(
            self.grid,
            self.nodes,
            MessageType.EVALUATE,
            model.state_dict(),
            final_round,
            self.cfg,
            config,
        )
        scored = [
            (wire.metric(c, Metric.ACCURACY), wire.metric(c, Metric.NUM_EXAMPLES))
            for c in replies
            if wire.metric(c, Metric.NUM_EXAMPLES) > 0
        ]
        total = sum(n for _, n in scored)
        if not total:
            raise RuntimeError(f"no member could evaluate on its {self.split} data")
        return sum(acc * n for acc, n in scored) / total


def _broadcast(
    grid: Grid,
    nodes: Iterable[int],
    message_type: str,
    state_dict: Mapping[str, Tensor],
    server_round: int,
    cfg: WashFedConfig,
    config: Mapping[str, str] | None = None,
) -> list[RecordDict]:
    """Send one model to every member; the contents of the successful replies."""
    arrays = {Record.ARRAYS: wire.tensors_to_record(state_dict)}
    messages = [
        wire.message(node, message_type, server_round, config, arrays, ttl=cfg.round_timeout)
        for node in nodes
    ]
    contents = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if reply.has_error():
            log(
                WARNING,
                "node %d failed %s: %s",
                reply.metadata.src_node_id,
                message_type,
                reply.error.reason,
            )
        else:
            contents.append(reply.content)
    return contents


def bn_statistics_from_members(
    grid: Grid,
    nodes: Iterable[int],
    soup: Mapping[str, Tensor],
    server_round: int,
    cfg: WashFedConfig,
) -> BNStatistics:
    """Federated BN recalibration: each member computes the soup's statistics on its own data;
    merged by batch count, exactly what one process would compute over all their batches."""
    parts = []
    for content in _broadcast(grid, nodes, MessageType.BN_STATISTICS, soup, server_round, cfg):
        record = content.array_records[Record.STATS]
        batches = int(wire.metric(content, Metric.BATCHES))
        parts.append(wire.record_to_bn_statistics(record, batches))
    return merge_bn_statistics(parts)


def evaluate_on_members(
    grid: Grid,
    nodes: Iterable[int],
    state_dict: Mapping[str, Tensor],
    server_round: int,
    cfg: WashFedConfig,
) -> dict[str, float]:
    """Federated evaluation of the final model: each member tests it on its own test data.
    Returns accuracy by partition id (members without test data are left out)."""
    contents = _broadcast(grid, nodes, MessageType.EVALUATE, state_dict, server_round, cfg)
    return {
        str(int(wire.metric(c, Metric.PARTITION_ID))): wire.metric(c, Metric.ACCURACY)
        for c in contents
        if Metric.ACCURACY in c.metric_records[Record.METRICS]
    }
