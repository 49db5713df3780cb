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
from logging import INFO
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor, nn

from server.replies import gather, log_rejections
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
    reference = running_statistics(model)
    exchanges = 0

    def federated_bn_statistics(soup: Mapping[str, Tensor]) -> BNStatistics:
        nonlocal exchanges
        exchanges += 1
        return bn_statistics_from_members(grid, roster, soup, reference, cfg, rejected)

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
    own_tests = evaluate_on_members(grid, roster, merge.final_state_dict, cfg, rejected)
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
        replies = _ask(
            self.grid,
            self.roster,
            MessageType.EVALUATE,
            model.state_dict(),
            self.cfg,
            arrays=None,
            what=f"evaluation on {self.split}",
            rejected=self.rejected,
            config={Config.SPLIT: self.split},
        )
        scored = []
        for partition, parts in replies.items():
            info = self.roster.info[partition]
            held = info.test_examples if self.split == Split.TEST else info.holdout_examples
            examples = min(float(parts.metrics.get(Metric.NUM_EXAMPLES, 0)), held)
            if examples > 0 and Metric.ACCURACY in parts.metrics:
                scored.append((float(parts.metrics[Metric.ACCURACY]), examples))
        total = sum(n for _, n in scored)
        if not total:
            raise RuntimeError(f"no member could evaluate on its {self.split} data")
        return sum(acc * n for acc, n in scored) / total


def _ask(
    grid: Grid,
    roster: Roster,
    message_type: str,
    state_dict: Mapping[str, Tensor],
    cfg: WashFedConfig,
    *,
    arrays: str | None,
    what: str,
    rejected: dict[int, str],
    config: Mapping[str, str] | None = None,
) -> dict[int, wire.ReplyParts]:
    """Send one model to every member; the replies of the right form, by partition id
    (:func:`server.replies.gather`). Failures are logged; rejections are logged and
    recorded in ``rejected``."""
    message_arrays = {Record.ARRAYS: wire.tensors_to_record(state_dict)}
    messages = [
        wire.message(
            node, message_type, cfg.final_round, config, message_arrays, ttl=cfg.round_timeout
        )
        for node in roster.nodes.values()
    ]
    replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
    got = gather(replies, roster.nodes, arrays, what)
    for partition, reason in got.rejected.items():
        _reject(rejected, partition, what, reason)
    return got.accepted


def _reject(rejected: dict[int, str], partition: int, what: str, reason: str) -> None:
    """Log a rejected reply (one line) and record it for the results."""
    log_rejections({partition: reason}, what)
    rejected.setdefault(partition, f"{what}: {reason}")


def bn_statistics_from_members(
    grid: Grid,
    roster: Roster,
    soup: Mapping[str, Tensor],
    reference: BNStatistics,
    cfg: WashFedConfig,
    rejected: dict[int, str],
) -> BNStatistics:
    """Federated BN recalibration: each member computes the soup's statistics on its own
    data; those that pass the gate (the model's layers, finite, variances not negative, not
    far from the others') are merged by batch count, each member's count capped at what its
    data can support: what one process would compute over all their batches."""
    what = "BatchNorm statistics"
    replies = _ask(
        grid, roster, MessageType.BN_STATISTICS, soup, cfg, arrays=Record.STATS, what=what,
        rejected=rejected,
    )  # fmt: skip
    stats: dict[int, BNStatistics] = {}
    for partition, parts in replies.items():
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
    cfg: WashFedConfig,
    rejected: dict[int, str],
) -> dict[str, float]:
    """Federated evaluation of the final model: each member tests it on its own test data.
    Returns accuracy by partition id (members without test data are left out)."""
    replies = _ask(
        grid, roster, MessageType.EVALUATE, state_dict, cfg, arrays=None, what="evaluation",
        rejected=rejected,
    )  # fmt: skip
    return {
        str(partition): float(parts.metrics[Metric.ACCURACY])
        for partition, parts in replies.items()
        if Metric.ACCURACY in parts.metrics
    }
