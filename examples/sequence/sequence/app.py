"""The Flower app: a WASH population of GRUs, each member trained by its own AdamW loop
(whose moments move with the weights: WASH+Opt), scored on the server's own test strings,
with the run's folder and Prometheus metrics (``output-dir``, ``metrics-port``)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch import nn

from wash_fed.clientapp import ExampleCounts, Task, TrainRound
from wash_fed.config import WashFedConfig
from wash_fed.member_app import MemberParts, wash_client_app
from wash_fed.strategy import RunRecord, Wash

from .task import DigitSumGRU, accuracy, digits, train_steps

TEST_SEED = 2**31 - 1
"""The server's test strings; a member's round ``r`` draws from ``(member, r)``."""


class DigitSumTask(Task):
    """One member's training: ``local-steps`` AdamW steps a round on strings of its own,
    tested on 500 strings of its own."""

    def __init__(self, context: Context, optimizer: torch.optim.Optimizer) -> None:
        self.member = int(context.node_config["partition-id"])
        self.steps = int(context.run_config["local-steps"])
        self.optimizer = optimizer
        self.test = digits(500, seed=10_000 + self.member)

    def train(self, model: nn.Module, round_: TrainRound) -> dict[str, float]:
        seed = 1_000 * self.member + round_.server_round
        loss = train_steps(model, self.optimizer, self.steps, seed)
        return {"loss": loss, "num-examples": self.steps * 64}

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float] | None:
        if split != "test":
            return None
        return {"accuracy": accuracy(model, *self.test), "num-examples": len(self.test[1])}

    def examples(self) -> ExampleCounts:
        return ExampleCounts(self.steps * 64, test=len(self.test[1]))


def member(context: Context) -> MemberParts:
    model = DigitSumGRU()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(context.run_config["lr"]))
    return MemberParts(model, DigitSumTask(context, optimizer), optimizer)


client_app = wash_client_app(member)

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = WashFedConfig.from_run_config(context.run_config)  # its keys; the app's are its own
    test_strings = digits(2000, TEST_SEED)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = DigitSumGRU()
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(model, *test_strings)})

    with RunRecord.open(cfg, grid.run.run_id) as record:  # results.json, ledger.csv, metrics
        result = Wash(cfg, record=record).start(
            grid=grid,
            initial_arrays=ArrayRecord(DigitSumGRU().state_dict()),
            evaluate_fn=evaluate,
        )
    torch.save(result.arrays.to_torch_state_dict(), str(context.run_config["final-model"]))
