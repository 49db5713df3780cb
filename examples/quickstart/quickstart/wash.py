"""The quickstart app in two forms: with FedAvg (fedavg.py) and with WASH (wash.py)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from wash_fed.clientapp import ExampleCounts, Task, TrainRound
from wash_fed.config import WashFedConfig
from wash_fed.member_app import MemberParts, wash_client_app
from wash_fed.strategy import Wash

from .task import DEVICE, Net, fit, node_data, score, size


class QuickstartTask(Task):
    def __init__(self, context: Context) -> None:
        self.context = context

    def train(self, model: nn.Module, round_: TrainRound) -> dict[str, float]:
        return fit(model, self.context)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float] | None:
        return score(model, self.context) if split == "test" else None

    def examples(self) -> ExampleCounts:
        trainloader, testloader = node_data(self.context)
        return ExampleCounts(size(trainloader), test=size(testloader))


client_app = wash_client_app(lambda context: MemberParts(Net().to(DEVICE), QuickstartTask(context)))


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    model = Net()
    strategy = Wash(WashFedConfig(num_members=int(context.run_config["num-members"])))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    torch.save(result.arrays.to_torch_state_dict(), str(context.run_config["final-model"]))
