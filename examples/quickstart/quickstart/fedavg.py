"""The quickstart app in two forms: with FedAvg (fedavg.py) and with WASH (wash.py)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .task import DEVICE, Net, fit, score

client_app = ClientApp()


@client_app.train()
def train_member(msg: Message, context: Context) -> Message:
    model = Net().to(DEVICE)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    metrics = MetricRecord({**fit(model, context)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate_member(msg: Message, context: Context) -> Message:
    model = Net().to(DEVICE)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    metrics = MetricRecord({**score(model, context)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    model = Net()
    strategy = FedAvg(fraction_evaluate=1.0)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    torch.save(result.arrays.to_torch_state_dict(), str(context.run_config["final-model"]))
