"""A model of the user's own: wash-fed builds it by import path,

    model = "examples.custom_task.tinynet:build"

calling ``build(num_classes=..., channels=..., image_size=(height, width))`` with the
run's task. Any ``nn.Module`` works; for WASH every member must build the same parameter
names and shapes (the pre-flight check compares them), and floating-point buffers other
than BatchNorm's running statistics are averaged into the soup like weights.
"""

from __future__ import annotations

from torch import Tensor, nn


class TinyNet(nn.Module):
    """Two convolutions with BatchNorm, global average pooling, one linear layer."""

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.features(x).flatten(1))
        return logits


def build(num_classes: int, channels: int, image_size: tuple[int, int]) -> nn.Module:
    """The factory wash-fed calls (the image size does not matter to this model)."""
    return TinyNet(num_classes, channels)
