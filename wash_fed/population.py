"""Single-process population trainer: N members in one process, on CUDA when available.

Runs the same protocol as the Flower app, without Flower: each round every member takes
``local-steps`` SGD steps, then the strategy communicates -- ``wash`` shuffles (one shuffle
event per round; ``local-steps=1`` is the paper's shuffle after every step), ``papa`` pulls
members toward the mean every ``papa-every`` rounds, ``papa-all`` replaces them by it,
``ensemble`` keeps them independent, ``fedavg`` starts every member from one model and
averages their full states every round. The ledger records the bytes that would travel if
the members were on separate machines. The final step builds and evaluates the soups (for
FedAvg: the last average) and saves the final model.

Examples::

    python -m wash_fed.population                         # WASH, the defaults
    python -m wash_fed.population --epochs 3 --variants ensemble,wash,wash+opt,papa,papa-all
    python -m wash_fed.population --shuffle-prob 0.01 --local-steps 1 --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from wash_fed.batchnorm import BNStatistics, merge_bn_statistics, running_statistics
from wash_fed.config import ConfigError, ConfigValue, WashFedConfig
from wash_fed.data import DatasetNotFoundError, ImageData
from wash_fed.evaluation import OnData, accuracy, predict
from wash_fed.gate import Admission, ReplyGate
from wash_fed.keys import Metric, Reply, ReplyKind
from wash_fed.ledger import Ledger
from wash_fed.merge import merge_population
from wash_fed.protocol import (
    Deliveries,
    Exchange,
    FedAvgServer,
    ServerProtocol,
    apply_delivery,
    fedavg_format,
    final_format,
    member_payload,
    payload_bytes,
    round_reply,
    server_protocol,
    wire_format,
)
from wash_fed.results import (
    GLOBAL_MODEL,
    EpochResult,
    FinalResult,
    RoundResult,
    RunFolder,
    RunResult,
    fedavg_equivalent_bytes,
)
from wash_fed.soup import uniform_soup
from wash_fed.training import (
    Member,
    TrainingData,
    TrainStats,
    configure_torch,
    initial_model,
    load_test_data,
    load_training_data,
    new_model,
    resolve_device,
)

__all__ = ["VARIANTS", "PopulationRun", "rounds_for_epochs", "run_population"]

VARIANTS: dict[str, dict[str, ConfigValue]] = {
    "ensemble": {"strategy": "ensemble"},
    "wash": {"strategy": "wash", "shuffle-optimizer-state": False},
    "wash+opt": {"strategy": "wash", "shuffle-optimizer-state": True},
    "papa": {"strategy": "papa"},
    "papa-all": {"strategy": "papa-all"},
    "fedavg": {"strategy": "fedavg"},
}
"""Named configurations compared side by side; each overrides the base configuration."""


@dataclass
class PopulationRun:
    """What :func:`run_population` returns (``results`` is also written to
    ``results.json``)."""

    config: WashFedConfig
    results: RunResult
    ledger: Ledger
    final_state_dict: dict[str, Tensor]
    member_state_dicts: list[dict[str, Tensor]]
    """Every member's weights after the final delivery, in member order."""
    output_dir: Path | None


@dataclass(frozen=True)
class GatedServer:
    """The strategy's server side behind the reply gate, as the ServerApp runs it: each
    round's payloads are admitted (:meth:`wash_fed.gate.ReplyGate.admit`), then exchanged."""

    protocol: ServerProtocol
    gate: ReplyGate

    def reply_for(self, round_: int) -> ReplyKind:
        return round_reply(self.protocol, round_)

    def exchange(self, round_: int, payloads: Mapping[int, Mapping[str, Tensor]]) -> Exchange:
        """The payloads (as they travel) read, admitted, exchanged."""
        return self.protocol.exchange(round_, self.admit(round_, payloads).accepted)

    def admit(
        self, round_: int, payloads: Mapping[int, Mapping[str, Tensor]]
    ) -> Admission[dict[str, Tensor]]:
        """The payloads read (:meth:`ServerProtocol.read`) and judged by the reply gate;
        one that cannot be read is left out with the reason."""
        read: dict[int, dict[str, Tensor]] = {}
        unreadable: dict[int, str] = {}
        for member, payload in payloads.items():
            try:
                read[member] = self.protocol.read(round_, payload)
            except ValueError as err:
                unreadable[member] = str(err)
        return self.gate.admit(
            read,
            lambda payload: self.protocol.payload_problem(round_, payload),
            what=f"round {round_}, left out of its exchange",
            earlier=unreadable,
            statistics=running_statistics(next(iter(read.values()), {})),
        )


def _train_round(
    members: list[Member],
    server: GatedServer,
    deliveries: Deliveries,
    round_: int,
    ledger: Ledger,
) -> tuple[list[TrainStats], Exchange]:
    """One round of the member protocol in memory: every member applies what is due to it,
    trains and sends its payload; the server exchanges (except after the last round, whose
    payloads are the members' whole models for the final step). Bytes go to the ledger as
    they would travel: deliveries down in the round they are applied, payloads up."""
    reply = server.reply_for(round_)
    server.protocol.prepare(round_, len(members))
    stats, payloads = [], {}
    for m in members:
        _deliver(m, deliveries, round_, "train", ledger)
        stats.append(m.train_steps(m.cfg.optim.local_steps))
        payloads[m.index] = member_payload(m, reply, round_)
        if payloads[m.index]:  # the last round's whole model is for the final step
            phase = "collect" if reply == Reply.FINAL else "train"
            ledger.record(round_, m.index, "up", phase, payload_bytes(payloads[m.index]))
    exchange = Exchange({}) if reply == Reply.FINAL else server.exchange(round_, payloads)
    deliveries.settle(payloads, exchange)
    return stats, exchange


def _deliver(m: Member, deliveries: Deliveries, round_: int, phase: str, ledger: Ledger) -> None:
    due = deliveries.due(m.index)
    if due is not None:
        apply_delivery(m, due)
        ledger.record(round_, m.index, "down", phase, payload_bytes(due.tensors))


def _evaluate_progress(
    members: list[Member], test: ImageData, batch_size: int
) -> tuple[float, float]:
    """Mean member test accuracy and the plain uniform soup's (no recalibration)."""
    member_acc = [accuracy(predict(m.model, test, batch_size), test.labels) for m in members]
    probe = build_like(members[0])
    probe.load_state_dict(uniform_soup([m.model.state_dict() for m in members]))
    soup_acc = accuracy(predict(probe, test, batch_size), test.labels)
    return sum(member_acc) / len(member_acc), soup_acc


def build_like(member: Member) -> nn.Module:
    """A fresh model of ``member``'s architecture on its device."""
    return new_model(member.cfg).to(member.device)


def run_population(
    cfg: WashFedConfig,
    *,
    data: TrainingData | None = None,
    test: ImageData | None = None,
    output_dir: Path | None = None,
    log: Callable[[str], None] = print,
    progress_eval: bool = True,
) -> PopulationRun:
    """Train the population of ``cfg`` to the end, merge it and, if ``output_dir`` is given,
    write ``results.json``, ``ledger.csv`` and ``final_model.pt`` there."""
    device = resolve_device(cfg.model.device)
    data = data or load_training_data(cfg)
    data = TrainingData(data.train.to(device), data.partitions, data.holdout)
    test = test or load_test_data(cfg)
    configure_torch(cfg)
    members = [Member(cfg, i, data.member(i), device) for i in range(cfg.num_members)]
    ledger = Ledger()
    server = GatedServer(_server(cfg, members, ledger), ReplyGate(cfg.gate.outlier_factor, log))
    deliveries = Deliveries()
    epochs_of_member_0 = cfg.total_steps * cfg.optim.batch_size / len(data.partitions[0])
    log(
        f"[{cfg.label}] {cfg.num_members} members of {cfg.model.name} on {cfg.data.dataset} "
        f"({device}), {cfg.num_server_rounds} rounds x {cfg.optim.local_steps} steps "
        f"= {epochs_of_member_0:.2f} epochs, {wire_format(cfg).name} on the wire"
    )
    start = time.perf_counter()
    rounds, epochs = _train(
        cfg, members, server, deliveries, ledger, test if progress_eval else None, log
    )
    train_seconds = time.perf_counter() - start
    if cfg.strategy == "fedavg":
        final, final_state = _fedavg_final(members, deliveries, test, cfg.final.eval_batch_size)
    else:
        final, final_state = _merge(members, data, test, ledger)
    model_bytes = payload_bytes(wire_format(cfg).encode(members[0].model.state_dict()))
    fedavg_model = payload_bytes(fedavg_format(cfg).encode(members[0].model.state_dict()))
    results = RunResult(
        "population",
        cfg.label,
        cfg,
        status="completed",
        rounds=rounds,
        epochs=epochs,
        final=final,
        bytes=ledger.summary(),
        fedavg_bytes=fedavg_equivalent_bytes(
            cfg.num_server_rounds, cfg.num_members, fedavg_model, fedavg_model
        ),
        wall_seconds=time.perf_counter() - start,
        device=str(device),
        threads=torch.get_num_threads(),
        train_seconds=train_seconds,
        model_bytes=model_bytes,
    )
    log(_final_line(results))
    if output_dir is not None:
        _save(RunFolder(output_dir, results, ledger, started=start), final_state, log)
    members_final = [
        {k: v.detach().clone() for k, v in m.model.state_dict().items()} for m in members
    ]
    return PopulationRun(cfg, results, ledger, final_state, members_final, output_dir)


def _save(folder: RunFolder, final_state: Mapping[str, Tensor], log: Callable[[str], None]) -> None:
    """The run's results, ledger and final model into its folder."""
    folder.directory.mkdir(parents=True, exist_ok=True)
    folder.write()
    folder.save_model(final_state)
    log(f"[{folder.result.label}] results, ledger and final model in {folder.directory}")


def _train(
    cfg: WashFedConfig,
    members: list[Member],
    server: GatedServer,
    deliveries: Deliveries,
    ledger: Ledger,
    test: ImageData | None,
    log: Callable[[str], None],
) -> tuple[list[RoundResult], list[EpochResult]]:
    """Every round of the run; returns one row per round and one per epoch (and the last
    round), the members evaluated on ``test`` at each epoch unless it is ``None``."""
    start = time.perf_counter()
    rounds: list[RoundResult] = []
    epochs: list[EpochResult] = []
    next_epoch = 1
    for r in range(1, cfg.num_server_rounds + 1):
        round_started = time.perf_counter()
        stats, exchange = _train_round(members, server, deliveries, r, ledger)
        rounds.append(_round_row(r, members, stats, exchange, ledger, round_started - start))
        if stats[0].epochs >= next_epoch or r == cfg.num_server_rounds:
            row = EpochResult(
                epoch=round(stats[0].epochs, 3),
                round=r,
                loss=sum(s.loss for s in stats) / len(stats),
                train_accuracy=sum(s.accuracy for s in stats) / len(stats),
                bytes=ledger.total(),
                seconds=time.perf_counter() - start,
            )
            if test is not None:
                member_mean, soup = _evaluate_progress(members, test, cfg.final.eval_batch_size)
                row = dataclasses.replace(row, member_mean=member_mean, soup=soup)
            epochs.append(row)
            log(_progress_line(cfg, row))
            next_epoch = math.floor(stats[0].epochs) + 1
    return rounds, epochs


def _round_row(
    round_: int,
    members: Sequence[Member],
    stats: Sequence[TrainStats],
    exchange: Exchange,
    ledger: Ledger,
    started: float,
) -> RoundResult:
    """One round in memory as ``results.json`` keeps it (``started``: seconds into the
    run when it began)."""
    this_round = ledger.by_round().get(round_, {"up": 0, "down": 0})
    seconds = time.perf_counter() - started
    return RoundResult(
        round=round_,
        seconds=seconds,
        bytes_up=this_round["up"],
        bytes_down=this_round["down"],
        bytes_total=ledger.total(),
        members={
            str(m.index): {Metric.LOSS: s.loss, Metric.TRAIN_ACCURACY: s.accuracy}
            for m, s in zip(members, stats, strict=True)
        },
        loss=sum(s.loss for s in stats) / len(stats),
        train_accuracy=sum(s.accuracy for s in stats) / len(stats),
        exchange=exchange.counts,
        exchange_digest=exchange.digest,
        elapsed=started + seconds,
    )


def _server(cfg: WashFedConfig, members: list[Member], ledger: Ledger) -> ServerProtocol:
    """The strategy's server side. FedAvg's members first receive one initial model (as
    Flower's FedAvg sends its global model in round 1), counted in the ledger."""
    if cfg.strategy != "fedavg":
        parameters = dict(members[0].model.named_parameters())
        return server_protocol(cfg, range(cfg.num_members), parameters, members[0].state_kinds())
    start = initial_model(cfg, 0).state_dict()
    sent = wire_format(cfg).encode(start)
    for m in members:
        m.model.load_state_dict(wire_format(cfg).decode(sent, start))
        ledger.record(1, m.index, "down", "train", payload_bytes(sent))
    return FedAvgServer(cfg, range(cfg.num_members), start)


def _fedavg_final(
    members: list[Member], deliveries: Deliveries, test: ImageData, batch_size: int
) -> tuple[FinalResult, dict[str, Tensor]]:
    """FedAvg's final model: the average after the last round, as it travels to the
    members (no step of its own)."""
    due = deliveries.due(members[0].index)
    if due is None:
        raise RuntimeError("FedAvg ended without an average: every member was rejected")
    model = build_like(members[0])
    average = wire_format(members[0].cfg).decode(due.tensors, model.state_dict())
    model.load_state_dict(average)
    global_accuracy = accuracy(predict(model, test, batch_size), test.labels)
    return FinalResult(global_accuracy, GLOBAL_MODEL), average


def _merge(
    members: list[Member],
    data: TrainingData,
    test: ImageData,
    ledger: Ledger,
) -> tuple[FinalResult, dict[str, Tensor]]:
    """The population's final step: the members' models as the last round sent them, the
    soups built and evaluated (recalibrating BatchNorm on the members' data), counting what
    travels."""
    cfg = members[0].cfg
    final_round, final = cfg.final_round, final_format(cfg)
    state_dicts = [final.through(m.model.state_dict()) for m in members]

    def bn_statistics_of(soup: Mapping[str, Tensor]) -> BNStatistics:
        parts = []
        for m in members:
            stats = m.bn_statistics(soup)
            parts.append(stats)
            sent = payload_bytes(final.encode(soup))
            ledger.record(final_round, m.index, "down", "bn", sent)
            ledger.record(
                final_round,
                m.index,
                "up",
                "bn",
                payload_bytes(stats.means) + payload_bytes(stats.variances),
            )
        return merge_bn_statistics(parts)

    holdout = data.holdout if cfg.final.soup == "greedy" else None  # the members' shares, together
    batch_size = cfg.final.eval_batch_size
    merge = merge_population(
        state_dicts,
        OnData(test, batch_size, lambda: build_like(members[0])),
        bn_statistics_of=bn_statistics_of if cfg.final.bn_recalibration else None,
        holdout=OnData(holdout, batch_size, lambda: build_like(members[0])).accuracy
        if holdout
        else None,
        final_soup=cfg.final.soup,
        as_sent=final.through,
    )
    return merge.figures(), merge.final_state_dict


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def _progress_line(cfg: WashFedConfig, row: EpochResult) -> str:
    line = (
        f"[{cfg.label}] epoch {row.epoch:.2f} | round {row.round}/{cfg.num_server_rounds} | "
        f"loss {row.loss:.4f} | train acc {row.train_accuracy:.4f}"
    )
    if row.member_mean is not None and row.soup is not None:
        line += f" | test: members {row.member_mean:.4f}, uniform soup {row.soup:.4f}"
    return line + f" | sent {_mb(row.bytes)} | {row.seconds:.1f} s"


def _final_line(results: RunResult) -> str:
    final = results.final_figures()
    sent = f"sent {_mb(results.sent())}"
    if final.member_mean is None:
        accuracy = final.final_accuracy
        return f"[{results.label}] test accuracy of the global model: {accuracy:.4f} | {sent}"
    soups = ", ".join(f"{k} {v:.4f}" for k, v in final.soups.items())
    ensemble = "-" if final.ensemble is None else f"{final.ensemble:.4f}"
    return (
        f"[{results.label}] test accuracy: members {final.member_mean:.4f} "
        f"(min {min(final.members):.4f}), ensemble {ensemble}, {soups} | "
        f"{sent} (FedAvg, same rounds: {_mb(results.fedavg_bytes or 0)})"
    )


SOUP_COLUMNS = ("uniform", "uniform+bn", "greedy+bn")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def comparison_table(results: Sequence[RunResult]) -> str:
    """A markdown table of several runs' final figures."""
    header = (
        "| variant | members (mean) | ensemble | uniform soup | uniform soup + BN "
        "| greedy soup + BN | sent, training (MB) | sent, total (MB) | train time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        f = r.final_figures()
        # FedAvg's global model is its members' uniform average after the last round.
        soups = f.soups or {"uniform": f.final_accuracy}
        built = [f"{soups[k]:.4f}" if k in soups else "-" for k in SOUP_COLUMNS]
        members = " | ".join(_cell(v) for v in (f.member_mean, f.ensemble))
        rows.append(
            f"| {r.label} | {members} | "
            + " | ".join(built)
            + f" | {r.sent(phase='train') / 1e6:.2f} | {r.sent() / 1e6:.2f} "
            + f"| {r.train_seconds:.0f} |"
        )
    return header + "\n".join(rows) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wash_fed.population",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated variants to run one after the other: {', '.join(VARIANTS)} "
        "(default: just the configured strategy)",
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train for this many epochs of member 0's data (sets num-server-rounds)",
    )
    for key, text in WashFedConfig.help().items():
        parser.add_argument(f"--{key}", dest=key, default=None, metavar="V", help=text)
    return parser


def rounds_for_epochs(cfg: WashFedConfig, data: TrainingData, epochs: int) -> int:
    """Rounds of ``cfg.optim.local_steps`` steps that make ``epochs`` epochs of member 0's data
    (whole batches; at least one round)."""
    steps = epochs * (len(data.partitions[0]) // cfg.optim.batch_size)
    return max(1, math.ceil(steps / cfg.optim.local_steps))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    given = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("variants", "epochs")
    }
    try:
        base = WashFedConfig.from_mapping(given)
        names = args.variants.split(",") if args.variants else [None]
        unknown = [n for n in names if n is not None and n not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        data = load_training_data(base)
        test = load_test_data(base)
    except (ConfigError, DatasetNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.epochs is not None:
        base = dataclasses.replace(
            base, num_server_rounds=rounds_for_epochs(base, data, args.epochs)
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for name in names:
        cfg = base.with_values(VARIANTS[name]) if name else base
        out = Path(cfg.output.output_dir) / f"population-{stamp}" / cfg.label
        results.append(run_population(cfg, data=data, test=test, output_dir=out).results)
    if len(results) > 1:
        table = comparison_table(results)
        path = Path(base.output.output_dir) / f"population-{stamp}" / "comparison.md"
        path.write_text(table)
        print(f"\n{table}\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
