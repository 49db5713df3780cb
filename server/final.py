"""The final step of a population run over Flower: collect the members, build the soups,
recalibrate BatchNorm with the members' own data, evaluate, save the final model.

Evaluation happens on the server's own test set when it has one (``test-on-server``);
otherwise the members evaluate on their own test data (:class:`OnMembers`), and the output
ensemble is not evaluated. Greedy-soup ingredients are picked on a server-side validation
set (``validation-path``) or on the members' held-out images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor, nn

from server.report import RunOutput
from server.roster import Roster
from server.strategies import PopulationStrategy
from wash_fed import wire
from wash_fed.batchnorm import BNStatistics, merge_bn_statistics, running_statistics
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData
from wash_fed.evaluation import Evaluator, OnData, PopulationAccuracy
from wash_fed.gate import (
    capped_batches,
    check_bn_statistics,
    check_metrics,
    magnitude_outliers,
    require_finite,
)
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
    roster = strategy.roster
    log(INFO, "final step: collecting %d members", len(roster.nodes))
    model = new_model(cfg)
    states, reported, rejected = strategy.collect(grid, cfg.round_timeout, model.state_dict())
    if not states:
        raise RuntimeError("no member could be collected; nothing to average")
    final_round = cfg.num_server_rounds + 1
    reference = running_statistics(model)
    exchanges = 0

    def federated_bn_statistics(soup: Mapping[str, Tensor]) -> BNStatistics:
        nonlocal exchanges
        exchanges += 1
        return bn_statistics_from_members(grid, roster, soup, reference, final_round, cfg, rejected)

    evaluator, holdout = _evaluators(grid, cfg, roster, test, validation, rejected, reported)
    merge = merge_population(
        list(states.values()),
        lambda: new_model(cfg),
        evaluator,
        bn_statistics_of=federated_bn_statistics if cfg.bn_recalibration else None,
        holdout=holdout,
        final_soup=cfg.soup,
    )
    require_finite(merge.final_state_dict, "the final model")
    output.save_model(merge.final_state_dict)
    if cfg.save_members:
        members = {f"{p}.{k}": v for p, sd in states.items() for k, v in sd.items()}
        output.save_model(members, "members.pt")
    own_tests = evaluate_on_members(
        grid, roster, merge.final_state_dict, final_round, cfg, rejected
    )
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
        "quarantined": sorted(roster.quarantined),
        "rejected": {str(p): reason for p, reason in sorted(rejected.items())},
        "bn_exchanges": exchanges,
        "evaluated_on": "server" if test is not None else "members",
        "members_own_evaluation": own_tests,
    }


def _evaluators(
    grid: Grid,
    cfg: WashFedConfig,
    roster: Roster,
    test: ImageData | None,
    validation: ImageData | None,
    rejected: dict[int, str],
    reported: Mapping[int, Mapping[str, Any]],
) -> tuple[Evaluator, Callable[[nn.Module], float] | None]:
    """Where the final step tests (the server's test set, else the members' own test data)
    and, for the greedy soup, where it picks ingredients (the server's validation set, else
    the members' held-out images; ``None`` for the other soups)."""
    evaluator: Evaluator = (
        OnData(test, cfg.eval_batch_size)
        if test is not None
        else OnMembers(grid, roster, cfg, Split.TEST, rejected, _own_accuracies(reported))
    )
    if cfg.soup != "greedy":
        return evaluator, None
    if validation is not None:
        return evaluator, OnData(validation, cfg.eval_batch_size).accuracy
    return evaluator, OnMembers(grid, roster, cfg, Split.HOLDOUT, rejected).accuracy


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
    a model's accuracy is the members' accuracies weighted by their examples (each capped at
    what it said it holds at hello); each member's own accuracy is what it reported
    (``own``); the ensemble is not evaluated."""

    grid: Grid
    roster: Roster
    cfg: WashFedConfig
    split: str
    rejected: dict[int, str]
    """Where rejections are recorded, by partition id."""
    own: list[float] | None = None

    def population(self, models: Sequence[nn.Module]) -> PopulationAccuracy:
        if self.own is None:
            raise ValueError("the members' own accuracies were not reported")
        return PopulationAccuracy(self.own, None)

    def accuracy(self, model: nn.Module) -> float:
        final_round = self.cfg.num_server_rounds + 1
        contents = _broadcast(
            self.grid,
            self.roster,
            MessageType.EVALUATE,
            model.state_dict(),
            final_round,
            self.cfg,
            {Config.SPLIT: self.split},
        )
        scored = []
        what = f"evaluation on {self.split}"
        for partition, parts in _gated(contents, None, what, self.rejected).items():
            info = self.roster.info[partition]
            held = info.test_examples if self.split == Split.TEST else info.holdout_examples
            examples = min(float(parts.metrics.get(Metric.NUM_EXAMPLES, 0)), held)
            if examples > 0 and Metric.ACCURACY in parts.metrics:
                scored.append((float(parts.metrics[Metric.ACCURACY]), examples))
        total = sum(n for _, n in scored)
        if not total:
            raise RuntimeError(f"no member could evaluate on its {self.split} data")
        return sum(acc * n for acc, n in scored) / total


def _broadcast(
    grid: Grid,
    roster: Roster,
    message_type: str,
    state_dict: Mapping[str, Tensor],
    server_round: int,
    cfg: WashFedConfig,
    config: Mapping[str, str] | None = None,
) -> dict[int, RecordDict]:
    """Send one model to every member; the contents of the successful replies, by partition
    id (failures are logged, one line each)."""
    arrays = {Record.ARRAYS: wire.tensors_to_record(state_dict)}
    messages = [
        wire.message(node, message_type, server_round, config, arrays, ttl=cfg.round_timeout)
        for node in roster.nodes.values()
    ]
    contents = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        partition = roster.partition_of(reply.metadata.src_node_id)
        if partition is None:
            continue
        if reply.has_error():
            reason = wire.error_reason(reply)
            log(WARNING, "member %d failed %s: %s", partition, message_type, reason)
        else:
            contents[partition] = reply.content
    return contents


def _reject(rejected: dict[int, str], partition: int, what: str, reason: str) -> None:
    """Log a rejected reply (one line) and record it for the results."""
    log(WARNING, "member %d: its %s is rejected: %s", partition, what, reason)
    rejected.setdefault(partition, f"{what}: {reason}")


def _gated(
    contents: Mapping[int, RecordDict], arrays: str | None, what: str, rejected: dict[int, str]
) -> dict[int, wire.ReplyParts]:
    """The replies whose records and metrics pass the gate, by partition id; the others
    are rejected (:func:`_reject`)."""
    passed = {}
    for partition, content in sorted(contents.items()):
        try:
            parts = wire.reply_parts(content, arrays)
            problem = check_metrics(parts.metrics)
        except wire.MalformedReplyError as err:
            problem = str(err)
        if problem is None:
            passed[partition] = parts
        else:
            _reject(rejected, partition, what, problem)
    return passed


def bn_statistics_from_members(
    grid: Grid,
    roster: Roster,
    soup: Mapping[str, Tensor],
    reference: BNStatistics,
    server_round: int,
    cfg: WashFedConfig,
    rejected: dict[int, str],
) -> BNStatistics:
    """Federated BN recalibration: each member computes the soup's statistics on its own
    data; those that pass the gate (the model's layers, finite, variances not negative, not
    far from the others') are merged by batch count, each member's count capped at what its
    data can support: what one process would compute over all their batches."""
    contents = _broadcast(grid, roster, MessageType.BN_STATISTICS, soup, server_round, cfg)
    stats: dict[int, BNStatistics] = {}
    what = "BatchNorm statistics"
    for partition, parts in _gated(contents, Record.STATS, what, rejected).items():
        claimed = int(parts.metrics.get(Metric.BATCHES, 0))
        batches = capped_batches(
            claimed, roster.info[partition].examples, cfg.batch_size, cfg.bn_batches
        )
        try:
            candidate = wire.tensors_to_bn_statistics(parts.tensors, batches)
            problem = check_bn_statistics(candidate, reference)
        except wire.MalformedReplyError as err:
            problem = str(err)
        if problem is None:
            stats[partition] = candidate
        else:
            _reject(rejected, partition, what, problem)
    flat = {partition: s.named_tensors() for partition, s in stats.items()}
    for partition, reason in magnitude_outliers(flat, cfg.outlier_factor).items():
        _reject(rejected, partition, what, reason)
        del stats[partition]
    return merge_bn_statistics(list(stats.values()))


def evaluate_on_members(
    grid: Grid,
    roster: Roster,
    state_dict: Mapping[str, Tensor],
    server_round: int,
    cfg: WashFedConfig,
    rejected: dict[int, str],
) -> dict[str, float]:
    """Federated evaluation of the final model: each member tests it on its own test data.
    Returns accuracy by partition id (members without test data are left out)."""
    contents = _broadcast(grid, roster, MessageType.EVALUATE, state_dict, server_round, cfg)
    return {
        str(partition): float(parts.metrics[Metric.ACCURACY])
        for partition, parts in _gated(contents, None, "evaluation", rejected).items()
        if Metric.ACCURACY in parts.metrics
    }
