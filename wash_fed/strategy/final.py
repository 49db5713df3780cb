"""The final step of a population run over Flower: collect the members, build the soups,
recalibrate BatchNorm with the members' own data, evaluate, save the final model.

Evaluation happens on the server's own test set when it has one (``test-on-server``);
otherwise the members evaluate on their own test data (:class:`OnMembers`), and the output
ensemble is not evaluated. Greedy-soup ingredients are picked on a server-side validation
set (``validation-path``) or on the members' held-out images.

Each member keeps the last model the final step sent it, so a model travels down to a
member once: a later message carries only the tensors that differ from it (after the
BatchNorm recalibration, the merged BatchNorm buffers). The collection and the soup's trip
down travel in ``final-dtype``; the soup is rounded to it before it is used, so the model
the members evaluate is the model saved, bit for bit.

The members' models come with the last training round's replies (each member's whole model
in ``final-dtype``, :data:`wash_fed.keys.Reply.FINAL`); a collect message goes only to
members whose reply the server lacks (a resumed run, a member that failed that round). Once
the final model is saved, one message both asks the members to evaluate it and ends the run
for them (``query.end``): after training, the final step is two message rounds (BatchNorm
statistics, evaluate and end) where no soup is chosen on the members' data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from wash_fed import wire
from wash_fed.batchnorm import BNStatistics, bn_layers_of, merge_bn_statistics
from wash_fed.config import WashFedConfig
from wash_fed.evaluation import Evaluator, PopulationAccuracy, StateDict
from wash_fed.gate import (
    Payload,
    ReplyGate,
    capped_batches,
    check_bn_statistics,
    require_finite,
)
from wash_fed.keys import Config, MessageType, Metric, Metrics, Record, Split
from wash_fed.merge import MergeResult, merge_population
from wash_fed.protocol import final_format
from wash_fed.results import FinalResult
from wash_fed.strategy.replies import gather, reply_gate
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.rounds import PopulationStrategy

__all__ = ["FinalExchanges", "FinalModel", "OnMembers", "ServerEvaluation", "final_step"]


@dataclass
class FinalExchanges:
    """The final step's messages to the members: each sends a model (whole, or as a patch
    over the one the member kept from the previous message) and gathers the replies by
    member. Every reply passes the run's reply gate; rejections are logged and recorded in
    :attr:`rejected`."""

    grid: Grid
    roster: Roster
    cfg: WashFedConfig
    rejected: dict[int, str] = field(default_factory=dict)
    """Why members' replies were rejected, by partition id."""
    held: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    """The model each member holds from the last message it answered."""
    bn_exchanges: int = 0
    """Message rounds the federated BatchNorm recalibration took."""
    gate: ReplyGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = reply_gate(self.cfg.gate)

    def ask(
        self,
        message_type: str,
        state_dict: Mapping[str, Tensor],
        *,
        arrays: str | None,
        what: str,
        config: Mapping[str, wire.ConfigValue] | None = None,
    ) -> dict[int, wire.ReplyParts]:
        """Send ``state_dict`` to every member; the replies of the right form, by
        partition id (:func:`wash_fed.strategy.replies.gather`; the values they carry are for the
        caller to admit)."""
        model = {name: t.detach().clone() for name, t in state_dict.items()}
        messages = []
        for partition, node in self.roster.nodes.items():
            tensors, patch = self._what_to_send(partition, model)
            messages.append(
                wire.message(
                    node,
                    message_type,
                    self.cfg.final_round,
                    {**(config or {}), Config.PATCH: patch},
                    {Record.ARRAYS: wire.tensors_to_record(tensors)},
                    ttl=self.cfg.runtime.round_timeout,
                )
            )
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.runtime.round_timeout)
        got = gather(replies, self.roster.nodes, arrays, what)
        for partition in self.roster.nodes:
            if partition in got.answered():
                self.held[partition] = model
            else:  # a member that failed may hold either model: send it whole next time
                self.held.pop(partition, None)
        return self.admit(got.accepted, _any_form, what=what, values=_none, earlier=got.rejected)

    def _what_to_send(
        self, partition: int, model: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], bool]:
        """The tensors to send member ``partition`` and whether they are a patch over the
        model it holds. Each floating-point tensor travels in the ``final-dtype`` format
        where that loses nothing (a soup is rounded to it before it is sent), else in its
        own dtype (the recalibrated BatchNorm buffers)."""
        held = self.held.get(partition)
        patch = held is not None and held.keys() == model.keys()
        tensors = (
            {n: t for n, t in model.items() if not torch.equal(t, held[n])}
            if held is not None and patch
            else dict(model)
        )
        return final_format(self.cfg).encode_lossless(tensors), patch

    def admit(
        self,
        payloads: Mapping[int, Payload],
        form: Callable[[Payload], str | None],
        *,
        what: str,
        values: Callable[[Payload], Mapping[str, Tensor]],
        earlier: Mapping[int, str],
        statistics: Collection[str] = (),
    ) -> dict[int, Payload]:
        """The payloads the reply gate admits (:meth:`wash_fed.gate.ReplyGate.admit`); why
        the others were left out is recorded for the results."""
        admission = self.gate.admit(
            payloads, form, what=what, values=values, earlier=earlier, statistics=statistics
        )
        for partition, reason in admission.rejected.items():
            self.rejected.setdefault(partition, f"{what}: {reason}")
        return admission.accepted

    def bn_statistics(self, soup: Mapping[str, Tensor], reference: BNStatistics) -> BNStatistics:
        """Federated BN recalibration: each member computes the soup's statistics on its own
        data; those that pass the gate (the model's layers, finite, variances not negative,
        not far from the others') are merged by batch count, each member's count capped at
        what its data can support: what one process would compute over all their batches."""
        what = "BatchNorm statistics"
        self.bn_exchanges += 1
        replies = self.ask(MessageType.BN_STATISTICS, soup, arrays=Record.STATS, what=what)
        candidates: dict[int, BNStatistics] = {}
        unreadable: dict[int, str] = {}
        for partition, parts in replies.items():
            claimed = int(parts.metrics.get(Metric.BATCHES, 0))
            examples = self.roster.info[partition].examples
            batches = capped_batches(
                claimed, examples, self.cfg.optim.batch_size, self.cfg.final.bn_batches
            )
            try:
                candidates[partition] = wire.tensors_to_bn_statistics(parts.tensors, batches)
            except wire.MalformedReplyError as err:
                unreadable[partition] = str(err)
        stats = self.admit(
            candidates,
            lambda s: check_bn_statistics(s, reference),
            what=what,
            values=BNStatistics.named_tensors,
            earlier=unreadable,
            statistics=reference.named_tensors().keys(),
        )
        return merge_bn_statistics(list(stats.values()))

    def evaluate_and_end(
        self, state_dict: Mapping[str, Tensor], earlier_runs: Sequence[int]
    ) -> dict[str, float]:
        """Federated evaluation of the final model in the message that ends the run (one
        message round for both): each member tests it on its own test data, then removes
        its checkpoints (and those of the ``earlier_runs`` this run continued) and its
        worker exits. Returns accuracy by partition id (members without test data are left
        out). Call it once the final model is saved: the run can no longer be resumed."""
        config = self.roster.end_config(completed=True, earlier_runs=earlier_runs)
        replies = self.ask(
            MessageType.END, state_dict, arrays=None, what="evaluation", config=config
        )
        self.roster.told_end.update(self.roster.nodes.values())
        return {
            str(partition): float(parts.metrics[Metric.ACCURACY])
            for partition, parts in replies.items()
            if Metric.ACCURACY in parts.metrics
        }


def _any_form(parts: wire.ReplyParts) -> None:
    """Replies whose records :func:`wash_fed.strategy.replies.gather` found right are of the form
    asked: what they carry is for the caller to admit."""


def _none(parts: wire.ReplyParts) -> dict[str, Tensor]:
    return {}


@dataclass(frozen=True)
class ServerEvaluation:
    """What the server evaluates with in the final step, where it can: ``test`` judges the
    members, their ensemble and the soups (None: the members evaluate on their own test
    data); ``holdout`` picks the greedy soup's ingredients (None: on the members' held-out
    data)."""

    test: Evaluator | None = None
    holdout: Callable[[StateDict], float] | None = None


FinalModel = Callable[[Mapping[str, Tensor], Mapping[int, Mapping[str, Tensor]]], None]
"""Receives the final model and every collected member's (by partition id) once they are
built, before the message that ends the run: where the ServerApp saves them."""


def final_step(
    grid: Grid,
    strategy: PopulationStrategy,
    reference: Mapping[str, Tensor],
    evaluation: ServerEvaluation,
    keep: FinalModel,
    earlier_runs: Sequence[int] = (),
) -> FinalResult:
    """Collect, merge, hand over and evaluate, the last message ending the run for the
    members; returns the final figures for ``results.json``.

    ``reference``: the model's state dict as the server knows it (names, shapes, dtypes:
    what the members' collections must match). ``keep`` receives the final model before
    the run ends (:data:`FinalModel`). ``earlier_runs``: the runs a resumed run continued
    (their member checkpoints go with this run's).
    """
    cfg, roster = strategy.cfg, strategy.roster
    # Without a test set of its own, the server weighs the members' own figures.
    states, reported, rejected = _collected(grid, strategy, reference, evaluation.test is None)
    exchanges = FinalExchanges(grid, roster, cfg, dict(rejected))
    bn_reference = bn_layers_of(reference)
    merge = merge_population(
        list(states.values()),
        evaluation.test or OnMembers(exchanges, Split.TEST, _own_accuracies(reported)),
        bn_statistics_of=(
            (lambda soup: exchanges.bn_statistics(soup, bn_reference))
            if cfg.final.bn_recalibration and bn_reference.means  # a model without BatchNorm
            else None  # has no statistics to recompute
        ),
        holdout=_holdout(exchanges, evaluation),
        final_soup=cfg.final.soup,
        as_sent=final_format(cfg).through,
    )
    require_finite(merge.final_state_dict, "the final model")
    keep(merge.final_state_dict, states)
    own_tests = exchanges.evaluate_and_end(merge.final_state_dict, earlier_runs)
    log(INFO, "[%s] test accuracy: %s", cfg.label, _accuracies(merge))
    return dataclasses.replace(
        merge.figures(),
        collected=sorted(states),
        quarantined=sorted(roster.quarantined),
        rejected={str(p): reason for p, reason in sorted(exchanges.rejected.items())},
        bn_exchanges=exchanges.bn_exchanges,
        evaluated_on="server" if evaluation.test is not None else "members",
        members_own_evaluation=own_tests,
    )


def _collected(
    grid: Grid, strategy: PopulationStrategy, reference: Mapping[str, Tensor], own_tests: bool
) -> tuple[dict[int, dict[str, Tensor]], dict[int, Metrics], dict[int, str]]:
    """Every member's model, in ``reference``'s dtypes, as the reply gate admitted it (a
    RuntimeError when none was), with the metrics it reported (its own test accuracy, with
    ``own_tests``); why the others were not."""
    collected, reported, rejected = strategy.collect(grid, reference, own_tests)
    log(
        INFO, "final step: %d members' models collected, %d left out", len(collected), len(rejected)
    )
    if not collected:
        raise RuntimeError("no member could be collected; nothing to average")
    return collected, reported, rejected


def _accuracies(merge: MergeResult) -> str:
    """The final step's test accuracies in one line: members, ensemble, soups, the final."""
    soups = ", ".join(f"{k} {v:.4f}" for k, v in merge.soups.items())
    ensemble = "-" if merge.ensemble is None else f"{merge.ensemble:.4f}"
    return (
        f"members {merge.member_mean:.4f} (min {min(merge.members):.4f}), ensemble {ensemble}, "
        f"{soups}; final: {merge.final_soup}"
    )


def _holdout(
    exchanges: FinalExchanges, evaluation: ServerEvaluation
) -> Callable[[StateDict], float] | None:
    """Where the greedy soup picks its ingredients: the server's held-out data, else the
    members' (``None`` for the other soups)."""
    if exchanges.cfg.final.soup != "greedy":
        return None
    return evaluation.holdout or OnMembers(exchanges, Split.HOLDOUT).accuracy


def _own_accuracies(reported: Mapping[int, Metrics]) -> list[float]:
    """The members' accuracies on their own test data, as their collect replies gave them."""
    own = [float(m[Metric.TEST_ACCURACY]) for m in reported.values() if Metric.TEST_ACCURACY in m]
    if not own:
        raise RuntimeError(
            "the server has no test set (test-on-server=false) and no member has test data "
            "(test-data-path in its node config, or the run's test set)"
        )
    return own


@dataclass
class OnMembers:
    """An :class:`~wash_fed.evaluation.Evaluator` over the members' own data (``split``):
    a model's accuracy is the members' accuracies weighted by their examples (each capped at
    what it said it holds at hello); each member's own accuracy is what it reported
    (``own``); the ensemble is not evaluated."""

    exchanges: FinalExchanges
    split: str
    own: list[float] | None = None

    def population(self, members: Sequence[StateDict]) -> PopulationAccuracy:
        if self.own is None:
            raise ValueError("the members' own accuracies were not reported")
        return PopulationAccuracy(self.own, None)

    def accuracy(self, state_dict: StateDict) -> float:
        replies = self.exchanges.ask(
            MessageType.EVALUATE,
            state_dict,
            arrays=None,
            what=f"evaluation on {self.split}",
            config={Config.SPLIT: self.split},
        )
        scored = []
        for partition, parts in replies.items():
            info = self.exchanges.roster.info[partition]
            held = info.test_examples if self.split == Split.TEST else info.holdout_examples
            examples = min(float(parts.metrics.get(Metric.NUM_EXAMPLES, 0)), held)
            if examples > 0 and Metric.ACCURACY in parts.metrics:
                scored.append((float(parts.metrics[Metric.ACCURACY]), examples))
        total = sum(n for _, n in scored)
        if not total:
            raise RuntimeError(f"no member could evaluate on its {self.split} data")
        return sum(acc * n for acc, n in scored) / total
