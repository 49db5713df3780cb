"""The final step of a population run over Flower: collect the members, build the soups,
recalibrate BatchNorm with the members' own data, evaluate, save the final model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from server.report import RunOutput
from server.strategies import PopulationStrategy
from wash_fed import wire
from wash_fed.batchnorm import BNStatistics, merge_bn_statistics
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData
from wash_fed.keys import MessageType, Metric, Record
from wash_fed.merge import merge_population
from wash_fed.training import new_model

__all__ = ["bn_statistics_from_members", "evaluate_on_members", "final_step"]


def final_step(
    grid: Grid,
    cfg: WashFedConfig,
    strategy: PopulationStrategy,
    test: ImageData,
    holdout: ImageData | None,
    output: RunOutput,
) -> dict[str, Any]:
    """Collect, merge and evaluate; returns the final figures for ``results.json``."""
    log(INFO, "final step: collecting %d members", len(strategy.roster.nodes))
    states = strategy.collect(grid, cfg.round_timeout)
    if not states:
        raise RuntimeError("no member could be collected; nothing to average")
    final_round = cfg.num_server_rounds + 1
    exchanges = 0

    def federated_bn_statistics(soup: Mapping[str, Tensor]) -> BNStatistics:
        nonlocal exchanges
        exchanges += 1
        nodes = strategy.roster.nodes.values()
        return bn_statistics_from_members(grid, nodes, soup, final_round, cfg)

    merge = merge_population(
        list(states.values()),
        lambda: new_model(cfg, test),
        test,
        batch_size=cfg.eval_batch_size,
        bn_statistics_of=federated_bn_statistics if cfg.bn_recalibration else None,
        holdout=holdout if cfg.soup == "greedy" else None,
        final_soup=cfg.soup,
    )
    output.save_model(merge.final_state_dict)
    if cfg.save_members:
        members = {f"{p}.{k}": v for p, sd in states.items() for k, v in sd.items()}
        output.save_model(members, "members.pt")
    own_tests = evaluate_on_members(
        grid, strategy.roster.nodes.values(), merge.final_state_dict, final_round, cfg
    )
    soups = ", ".join(f"{k} {v:.4f}" for k, v in merge.soups.items())
    log(
        INFO,
        "[%s] test accuracy: members %.4f (min %.4f), ensemble %.4f, %s; final: %s",
        cfg.label,
        merge.member_mean,
        min(merge.members),
        merge.ensemble,
        soups,
        merge.final_soup,
    )
    return merge.as_dict() | {
        "collected": sorted(states),
        "bn_exchanges": exchanges,
        "members_own_evaluation": own_tests,
    }


def _broadcast(
    grid: Grid,
    nodes: Iterable[int],
    message_type: str,
    state_dict: Mapping[str, Tensor],
    server_round: int,
    cfg: WashFedConfig,
) -> list[RecordDict]:
    """Send one model to every member; the contents of the successful replies."""
    arrays = {Record.ARRAYS: wire.tensors_to_record(state_dict)}
    messages = [
        wire.message(node, message_type, server_round, arrays=arrays, ttl=cfg.round_timeout)
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
    Returns accuracy by partition id."""
    contents = _broadcast(grid, nodes, MessageType.EVALUATE, state_dict, server_round, cfg)
    return {
        str(int(wire.metric(c, Metric.PARTITION_ID))): wire.metric(c, Metric.ACCURACY)
        for c in contents
    }
