"""WASH -- and PAPA, and independent members -- as a Flower strategy that any ServerApp
starts the way it starts ``FedAvg``::

    strategy = Wash(WashFedConfig(num_members=4))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=30)
    torch.save(result.arrays.to_torch_state_dict(), "soup.pt")

``start`` checks every member before any training (the pre-flight hello: the settings every
member must share travel with it, and each member's model must have the layout of
``initial_arrays``), runs the rounds through Flower's ``Strategy.start`` (per-member
messages and deliveries, :mod:`wash_fed.strategy.rounds`; the last round's replies carry
the members' models), then the final step (merge into the soup, recalibrate BatchNorm,
evaluate: :mod:`wash_fed.strategy.final`), and tells every member that
the run ended -- also when it fails. Every message goes through a
:class:`~wash_fed.strategy.ledger_grid.LedgerGrid`, so :attr:`Wash.ledger` holds every byte
sent. Given a :class:`~wash_fed.strategy.record.RunRecord`, it writes the run's folder and
feeds its Prometheus metrics as the rounds go.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, MetricRecordValues
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.evaluation import PopulationAccuracy, StateDict
from wash_fed.keys import Metric
from wash_fed.ledger import Ledger
from wash_fed.protocol import server_protocol
from wash_fed.results import FinalResult
from wash_fed.strategy.final import FinalModel, ServerEvaluation, final_step
from wash_fed.strategy.ledger_grid import LedgerGrid
from wash_fed.strategy.record import RunRecord, fedavg_bytes_through_flower
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.rounds import PopulationStrategy
from wash_fed.strategy.state import RoundReport, StrategyState

__all__ = ["ByFunction", "Continuation", "Wash"]


@dataclass(frozen=True)
class Continuation:
    """Where a resumed run takes up an earlier one: the run whose member checkpoints it
    continues, the round it continues after, the strategy's state then, and the credentials
    its members hold."""

    run_id: int
    round: int
    state: StrategyState
    credentials: dict[int, str]
    earlier_runs: list[int] = field(default_factory=list)
    """Every run in the chain it continues (their member checkpoints go with this run's)."""


@dataclass(frozen=True)
class ByFunction:
    """An :class:`~wash_fed.evaluation.Evaluator` from a Flower ``evaluate_fn``
    (``(server_round, arrays) -> MetricRecord`` with ``accuracy``), called with the run's
    last round: it judges the members and the soups; the output ensemble, which needs
    predictions, is not evaluated."""

    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]
    server_round: int

    def population(self, members: Sequence[StateDict]) -> PopulationAccuracy:
        return PopulationAccuracy([self.accuracy(m) for m in members], None)

    def accuracy(self, state_dict: StateDict) -> float:
        metrics = self.evaluate_fn(self.server_round, ArrayRecord(dict(state_dict)))
        value = None if metrics is None else metrics.get(Metric.ACCURACY)
        if not isinstance(value, (int, float)):
            raise ValueError(
                f"evaluate_fn returned {metrics!r}: a MetricRecord with a number "
                f"{Metric.ACCURACY!r} was expected"
            )
        return float(value)


class Wash(Strategy):
    """WASH, PAPA, PAPA-all or independent members (``cfg.strategy``) over
    ``cfg.num_members`` members, one per SuperNode (its ``partition-id``), each answering
    the member protocol (:class:`wash_fed.clientapp.WashMember`).

    ``cfg`` holds every setting (its ``exchange``, ``final``, ``gate`` and ``runtime``
    sections are the strategy's; the data, model and optimizer sections are the built-in
    app's and are not read). Optional hooks: ``evaluation`` where the server itself
    evaluates the final step (:func:`start`'s ``evaluate_fn`` is the other way to give
    one), ``keep`` receives the final model and every member's before the run ends,
    ``on_round`` each round's report, ``record`` the run's folder and metrics (each round,
    the members' nodes, the final figures; its ledger is the strategy's),
    ``continuation`` where a resumed run takes up an earlier one.
    """

    def __init__(
        self,
        cfg: WashFedConfig | None = None,
        *,
        evaluation: ServerEvaluation | None = None,
        keep: FinalModel | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        record: RunRecord | None = None,
        continuation: Continuation | None = None,
    ) -> None:
        self.cfg = cfg or WashFedConfig()
        if self.cfg.strategy == "fedavg":
            raise ValueError("strategy='fedavg' is Flower's own FedAvg; Wash runs the others")
        self.evaluation = evaluation or ServerEvaluation()
        self.keep = keep
        self.on_round = on_round
        self.record = record
        self.continuation = continuation
        self.ledger = record.ledger if record is not None else Ledger()
        """Every byte the run sent and received, by member, round and phase."""
        self.roster: Roster | None = None
        """The members by partition id, once :meth:`start` checked them."""
        self.final: FinalResult | None = None
        """The final step's figures, once it ran."""
        self.final_model: StateDict | None = None
        """The model the run hands over (the soup ``cfg.final.soup`` names), once built."""
        self._rounds: PopulationStrategy | None = None
        self._grid: LedgerGrid | None = None
        self._fedavg: int | None = None

    @property
    def rounds(self) -> PopulationStrategy:
        """The rounds under way (a RuntimeError before :meth:`start` checked the members)."""
        if self._rounds is None:
            raise RuntimeError("Wash has no rounds before start() has checked its members")
        return self._rounds

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Check the members, run ``num_rounds`` rounds (default ``cfg.num_server_rounds``;
        ``timeout`` per round, default ``cfg.runtime.round_timeout``), then the final step.

        ``initial_arrays``: the model's state dict (what the members' models must match;
        the members start from their own weights). ``train_config`` travels with every
        training message (the member's task reads it). ``evaluate_fn``: the server scores
        the members and the soups with it. Returns Flower's ``Result``: ``arrays`` is the
        final model, ``train_metrics_clientapp`` the members' mean metrics by round,
        ``evaluate_metrics_serverapp`` the final accuracies under the last round.
        """
        del evaluate_config  # members report their test accuracy with their training replies
        cfg = self.cfg = dataclasses.replace(
            self.cfg,
            num_server_rounds=num_rounds or self.cfg.num_server_rounds,
            runtime=dataclasses.replace(
                self.cfg.runtime, round_timeout=timeout or self.cfg.runtime.round_timeout
            ),
        )
        if evaluate_fn is not None:
            self.evaluation = ServerEvaluation(
                ByFunction(evaluate_fn, cfg.final_round), self.evaluation.holdout
            )
        ledger_grid = self._grid = self._ledger_grid(grid)
        reference = wire.record_to_tensors(initial_arrays)
        roster = self.roster = Roster(cfg, reference, on_bind=ledger_grid.bind)
        earlier = self.continuation.earlier_runs if self.continuation else []
        with roster.ending(ledger_grid, earlier):
            self._check_members(ledger_grid, roster)
            self._run_rounds(ledger_grid, train_config)
            self.final = final_step(
                ledger_grid, self.rounds, reference, self.evaluation, self._kept, earlier
            )
        if self.record is not None:
            self.record.finish(self.final, self._fedavg_bytes())
        log(
            INFO,
            "[%s] done: %.2f MB up, %.2f MB down in all (strategy.ledger has every message)",
            cfg.label,
            self.ledger.total("up") / 1e6,
            self.ledger.total("down") / 1e6,
        )
        return self._result()

    def _ledger_grid(self, grid: Grid) -> LedgerGrid:
        """``grid`` counting into the strategy's ledger (and the record's metrics)."""
        if isinstance(grid, LedgerGrid):
            if self.record is not None and grid.ledger is not self.record.ledger:
                raise ValueError("the LedgerGrid given counts into another ledger than the record")
            self.ledger = grid.ledger
            return grid
        if self.record is not None:
            return self.record.grid(grid)
        return LedgerGrid.for_run(grid, self.ledger, self.cfg.runtime)

    def _fedavg_bytes(self) -> int:
        """What FedAvg would send over the run, for the record (measured once)."""
        if self._fedavg is None:
            roster = self.rounds.roster
            nodes = roster.nodes.values()
            self._fedavg = fedavg_bytes_through_flower(self.cfg, roster.reference, nodes)
        return self._fedavg

    def _round_done(self, report: RoundReport) -> None:
        """A finished round into the record, then to ``on_round``."""
        if self.record is not None and self._grid is not None:
            self.record.output.record_members(self.rounds.roster.nodes)
            self.record.round(self._grid, report, self._fedavg_bytes())
        if self.on_round is not None:
            self.on_round(report)

    def _check_members(self, grid: LedgerGrid, roster: Roster) -> None:
        """The pre-flight hello (continuing an earlier run where asked), then the rounds'
        strategy over the members that passed."""
        cfg, continuation = self.cfg, self.continuation
        if continuation is not None:
            roster.continues = (continuation.run_id, continuation.round)
            roster.credentials = dict(continuation.credentials)
        roster.connect(grid)
        parameters = {name: roster.reference[name] for name in roster.parameters}
        everyone = range(cfg.num_members)  # members still to come too
        protocol = server_protocol(cfg, everyone, parameters, roster.state_kinds)
        self._rounds = PopulationStrategy(
            cfg, roster, protocol, self._round_done, members_test=self.evaluation.test is None
        )
        if continuation is not None:
            self._rounds.continue_from(continuation.state.resumed_at(continuation.round))
        self._rounds.state.missing |= roster.absent  # looked for at every round

    def _run_rounds(self, grid: Grid, train_config: ConfigRecord | None) -> None:
        """The rounds still to run, through Flower's ``Strategy.start``; a RuntimeError
        naming why when no member completed one."""
        rounds = self.rounds
        left = self.cfg.num_server_rounds - rounds.state.rounds_done
        if left > 0:
            super().start(
                grid=grid,
                initial_arrays=ArrayRecord(),
                num_rounds=left,
                timeout=self.cfg.runtime.round_timeout,
                train_config=train_config,
            )
        if not any(report.metrics for report in rounds.state.history):
            why = rounds.state.reasons()
            reasons = "; ".join(f"member {p}: {reason}" for p, reason in sorted(why.items()))
            raise RuntimeError(f"no member completed a single round ({reasons or 'no round ran'})")

    def _kept(self, model: StateDict, members: Mapping[int, StateDict]) -> None:
        self.final_model = model
        if self.keep is not None:
            self.keep(model, members)

    def _result(self) -> Result:
        """Flower's Result of the run: the final model, the members' mean metrics by round,
        the final accuracies under the last round."""
        final, model = self.final, self.final_model
        assert final is not None and model is not None  # the final step ran
        figures: dict[str, MetricRecordValues] = {"final-accuracy": final.final_accuracy}
        if final.member_mean is not None:
            figures["member-mean"] = final.member_mean
        if final.ensemble is not None:
            figures["ensemble"] = final.ensemble
        result = Result(arrays=ArrayRecord(dict(model)))
        result.train_metrics_clientapp = {
            r.round: MetricRecord(dict(r.member_means())) for r in self.rounds.state.history
        }
        result.evaluate_metrics_serverapp = {self.cfg.final_round: MetricRecord(figures)}
        return result

    # --- Flower's Strategy interface: the rounds' ---------------------------------------

    def summary(self) -> None:
        self.rounds.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.rounds.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.rounds.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.rounds.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.rounds.aggregate_evaluate(server_round, replies)
