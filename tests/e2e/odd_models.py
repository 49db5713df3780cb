"""A model factory whose members disagree with the server (tests only): a member's process
(one that has loaded the member's code, ``client.task``) builds 24 channels where the
ServerApp builds 16, as a member with another version of the model's code would. Only its
layout matters: the run must stop at the pre-flight check, before any forward pass."""

from __future__ import annotations

import sys

from torch import nn

from examples.custom_task.tinynet import TinyNet


def build(num_classes: int, channels: int, image_size: tuple[int, int]) -> nn.Module:
    model = TinyNet(num_classes, channels)
    if "client.task" in sys.modules:
        model.features[0] = nn.Conv2d(channels, 24, 3, padding=1, bias=False)
    return model
