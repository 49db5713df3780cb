"""The model, the data and the training loop, the same for the FedAvg and the WASH form."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from flwr.app import Context
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wash_fed.data import load_split

DEVICE = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


class Net(nn.Module):
    """LeNet-style CNN for 28x28 grey images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits


Loader = DataLoader[tuple[torch.Tensor, ...]]


def load_data(partition_id: int, num_partitions: int, examples: int) -> tuple[Loader, Loader]:
    """This partition's training images (``examples`` of them, a fixed draw) and its share
    of the test set, from the Fashion-MNIST files on disk (``make data``)."""
    train, test = load_split("fashion-mnist", train=True), load_split("fashion-mnist", train=False)
    order = np.random.default_rng(0).permutation(len(train))
    mine = np.array_split(order, num_partitions)[partition_id][:examples]
    tests = np.array_split(np.arange(len(test)), num_partitions)[partition_id]
    trainloader = DataLoader(TensorDataset(*train.batch(mine)), batch_size=32, shuffle=True)
    testloader = DataLoader(TensorDataset(*test.batch(tests)), batch_size=256)
    return trainloader, testloader


def train(
    net: nn.Module,
    trainloader: Loader,
    epochs: int,
    lr: float,
    device: torch.device,
) -> float:
    """Train ``net`` for ``epochs`` epochs; its mean training loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss, batches = running_loss + loss.item(), batches + 1
    return running_loss / batches


def test(net: nn.Module, testloader: Loader, device: torch.device) -> tuple[float, float]:
    """``net``'s mean loss and accuracy on ``testloader``."""
    net.to(device)
    net.eval()
    criterion = nn.CrossEntropyLoss()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item() * len(labels)
            correct += int((outputs.argmax(1) == labels.to(device)).sum())
    return loss / size(testloader), correct / size(testloader)


def size(loader: Loader) -> int:
    """How many examples ``loader`` holds."""
    return len(cast(TensorDataset, loader.dataset))


def node_data(context: Context) -> tuple[Loader, Loader]:
    """The node's training and test data, as the run configures them."""
    node, run = context.node_config, context.run_config
    partition, partitions = int(node["partition-id"]), int(node["num-partitions"])
    return load_data(partition, partitions, int(run["examples-per-member"]))


def fit(model: nn.Module, context: Context) -> dict[str, float]:
    """Train ``model`` on the node's data as the run configures it; its metrics."""
    trainloader, _ = node_data(context)
    epochs, lr = int(context.run_config["local-epochs"]), float(context.run_config["lr"])
    loss = train(model, trainloader, epochs, lr, DEVICE)
    return {"train-loss": loss, "num-examples": size(trainloader)}


def score(model: nn.Module, context: Context) -> dict[str, float]:
    """``model``'s loss and accuracy on the node's test data."""
    _, testloader = node_data(context)
    loss, accuracy = test(model, testloader, DEVICE)
    return {"loss": loss, "accuracy": accuracy, "num-examples": size(testloader)}
