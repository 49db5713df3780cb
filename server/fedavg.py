"""FedAvg -- Flower's own strategy, unchanged -- on the same members, model, data and rounds
as the population strategies, and what it would have sent in their place."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from wash_fed import wire
from wash_fed.batchnorm import running_statistics
from wash_fed.codec import WireFormat
from wash_fed.config import WashFedConfig
from wash_fed.evaluation import StateDict
from wash_fed.gate import ReplyGate, check_model, require_finite
from wash_fed.keys import Config, Metric, Record, Reply
from wash_fed.protocol import wire_format
from wash_fed.results import GLOBAL_MODEL, FinalResult
from wash_fed.strategy.ledger_grid import LedgerGrid
from wash_fed.strategy.record import RunRecord
from wash_fed.strategy.replies import Replies, gather, reply_gate
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.state import RoundReport
from wash_fed.training import initial_model, new_model

__all__ = ["FedAvgRounds", "GatedFedAvg", "run_fedavg"]


class FedAvgRounds:
    """FedAvg's rounds as round reports. :meth:`note` keeps what each round's replies were
    (accepted, rejected, failed); :meth:`close` (FedAvg's ``evaluate_fn``, called once at
    the end of every round) evaluates the global model when due and reports the round with
    what was kept since the last one -- so a round in which every reply failed reports no
    members instead of shifting later rounds."""

    def __init__(
        self,
        cfg: WashFedConfig,
        test_accuracy: Callable[[StateDict], float],
        on_round: Callable[[RoundReport], None],
    ) -> None:
        self.cfg = cfg
        self.test_accuracy = test_accuracy
        self.on_round = on_round
        self._kept = Replies()
        self._started = time.perf_counter()

    def note(self, got: Replies) -> None:
        self._kept = got

    def close(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # FedAvg evaluates the initial model too
            return None
        evaluated: dict[str, float] = {}
        if self.cfg.evaluates_at(server_round):
            model = new_model(self.cfg)
            model.load_state_dict(wire.record_to_tensors(arrays))
            evaluated[Metric.TEST_ACCURACY] = self.test_accuracy(model.state_dict())
        kept = self._kept
        members = {p: {**parts.metrics, **evaluated} for p, parts in kept.accepted.items()}
        seconds = time.perf_counter() - self._started
        report = RoundReport(
            server_round, members, kept.failed, seconds, {}, rejected=kept.rejected
        )
        self.on_round(report)
        self._kept = Replies()
        self._started = time.perf_counter()
        return MetricRecord(dict(evaluated)) if evaluated else None


class GatedFedAvg(FedAvg):
    """Flower's FedAvg, its algorithm unchanged, whose training replies first pass the
    reply gate: replies by the roster's members only, of the right form, tensors of the
    model's names, shapes and dtypes, finite, and not far from the others' (the magnitude
    bound of :func:`wash_fed.gate.magnitude_outliers`). Rejected replies are logged and left
    out of the average.

    Models travel in ``wire_format`` both ways: the global model is encoded as it is sent,
    and each reply decoded (against ``reference``, the model's state dict) before the gate
    and the average see it, so FedAvg averages float32 models whatever travelled."""

    def __init__(
        self,
        *,
        roster: Roster,
        reference: Mapping[str, Tensor],
        wire_format: WireFormat,
        gate: ReplyGate,
        rounds: FedAvgRounds,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.roster = roster
        self.reference = dict(reference)
        self.format = wire_format
        self.gate = gate
        self.rounds = rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Flower averages integer buffers too (BatchNorm's batch count): back to their dtype.
        model = {
            k: t.to(self.reference[k].dtype) for k, t in wire.record_to_tensors(arrays).items()
        }
        sent = wire.tensors_to_record(self.format.encode(model))
        return super().configure_train(server_round, sent, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        got = gather(
            replies,
            self.roster.nodes,
            Record.ARRAYS,
            f"round {server_round}",
            lambda tensors: self.format.decode(tensors, self.reference),
        )
        got.admitted(
            self.gate.admit(
                got.accepted,
                lambda parts: check_model(parts.tensors, self.reference),
                what=f"round {server_round}, left out of the average",
                values=lambda parts: parts.tensors,
                earlier=got.rejected,
                statistics=running_statistics(self.reference),
            )
        )
        self.rounds.note(got)
        for partition, message in got.messages.items():  # averaged as decoded
            message.content[Record.ARRAYS] = wire.tensors_to_record(got.accepted[partition].tensors)
        return super().aggregate_train(server_round, list(got.messages.values()))


def run_fedavg(
    grid: LedgerGrid,
    cfg: WashFedConfig,
    roster: Roster,
    test_accuracy: Callable[[StateDict], float],
    record: RunRecord,
) -> FinalResult:
    """Flower's FedAvg, unchanged, behind the reply gate: one global model that every
    member trains each round.

    Per-round figures come through FedAvg's own hooks: ``aggregate_train`` (gated) keeps
    the members' replies, ``evaluate_fn`` closes each round (evaluating with
    ``test_accuracy``, on the server's test set or the members').
    """
    rounds = FedAvgRounds(cfg, test_accuracy, lambda report: record.round(grid, report, None))
    initial = initial_model(cfg, 0).state_dict()
    strategy = GatedFedAvg(
        roster=roster,
        reference=initial,
        wire_format=wire_format(cfg),
        gate=reply_gate(cfg.gate),
        rounds=rounds,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=len(roster.nodes),  # those that passed the pre-flight check
        min_available_nodes=len(roster.nodes),
    )
    # Members read everything else from the run config; "reply" asks for the full state.
    result = strategy.start(
        grid=grid,
        initial_arrays=wire.tensors_to_record(initial),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.runtime.round_timeout,
        train_config=ConfigRecord({Config.REPLY: Reply.STATE}),
        evaluate_fn=rounds.close,
    )
    model = new_model(cfg)
    model.load_state_dict(wire.record_to_tensors(result.arrays))
    require_finite(model.state_dict(), "the global model")
    record.output.save_model(model.state_dict())
    final_accuracy = test_accuracy(model.state_dict())
    log(INFO, "[fedavg] test accuracy of the global model: %.4f", final_accuracy)
    return FinalResult(final_accuracy, GLOBAL_MODEL)
