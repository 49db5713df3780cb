"""The task: is the sum of 12 random digits above 54 (the median)? Each member generates
its own strings of digits; the server generates the test strings. A GRU reads the digits
one by one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

LENGTH = 12
THRESHOLD = 54
BATCH = 64


def digits(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` strings of digits drawn from ``seed``, shape ``(count, LENGTH)``, and their
    labels (1 where the digits sum above ``THRESHOLD``), shape ``(count,)``."""
    generator = torch.Generator().manual_seed(seed)
    strings = torch.randint(0, 10, (count, LENGTH), generator=generator)
    return strings, (strings.sum(1) > THRESHOLD).long()


class DigitSumGRU(nn.Module):
    """Embeds each digit, reads the string with a GRU, classifies its last state."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.gru = nn.GRU(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, strings: Tensor) -> Tensor:
        states, _ = self.gru(self.embed(strings))
        logits: Tensor = self.head(states[:, -1])
        return logits


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> float:
    """``steps`` AdamW steps on fresh strings drawn from ``seed``; the mean loss."""
    model.train()
    strings, labels = digits(steps * BATCH, seed)
    criterion, total = nn.CrossEntropyLoss(), 0.0
    for step in range(steps):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        optimizer.zero_grad()
        loss = criterion(model(strings[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / steps


@torch.no_grad()
def accuracy(model: nn.Module, strings: Tensor, labels: Tensor) -> float:
    """Share of ``strings`` whose label ``model`` predicts right."""
    model.eval()
    return float((model(strings).argmax(1) == labels).float().mean())
