"""Models by name: ``cnn`` (small, for Fashion-MNIST), ``cnn-wide`` (the same with a
512-unit head: a few MB), ``resnet18`` (CIFAR form), any
torchvision classification model as ``torchvision:<name>`` (randomly initialised; no weights
are ever downloaded), or a model of the user's own by import path, ``package.module:factory``,
called as ``factory(num_classes=..., channels=..., image_size=(height, width))``."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping

from torch import Tensor, nn

__all__ = [
    "SmallCNN",
    "build_model",
    "model_layout",
    "model_problem",
    "resnet18_cifar",
    "state_layout",
]

TORCHVISION_PREFIX = "torchvision:"
WIDE_CNN_HIDDEN = 512
"""The head of ``cnn-wide``: a model of a few MB whose bytes, not Flower's delivery, set a
round's time on slow links."""
BUILT_IN = ("cnn", "cnn-wide", "resnet18")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a two-layer head of ``hidden`` units; input
    ``(b, C, H, W)``.

    For ``(1, 28, 28)`` inputs and ten classes: about 120k parameters with the default
    ``hidden=32``, 1.6 M (6.5 MB in float32) with ``hidden=512``, where the head holds 99%
    of them and the convolutions still most of the compute.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: tuple[int, int] = (28, 28),
        hidden: int = 32,
    ) -> None:
        super().__init__()
        features = 64 * (image_size[0] // 4) * (image_size[1] // 4)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x))
        return out


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 in the CIFAR form: a 3x3 stride-1 stem and no max-pool."""
    from torchvision.models import resnet18

    model: nn.Module = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class _RepeatChannels(nn.Module):
    """Repeat a one-channel image to three channels (grayscale input to an RGB model)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1)


def model_problem(name: str) -> str | None:
    """Why ``name`` names no model this module builds (``None``: it does)."""
    if name in BUILT_IN:
        return None
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision.models as tvm

        arch = name.removeprefix(TORCHVISION_PREFIX)
        classification = tvm.list_models(module=tvm)
        if arch not in classification:
            return (
                f"model {name!r}: {arch!r} is not a torchvision classification model; "
                f"some that are: {', '.join(classification[:8])}, ..."
            )
        return None
    if _IMPORT_PATH.fullmatch(name):
        return None  # imported where the model is built: the ServerApp and every member
    return (
        f"unknown model {name!r}; choose {', '.join(map(repr, BUILT_IN))}, 'torchvision:<name>' "
        "or an import path 'package.module:factory'"
    )


def _from_import_path(
    path: str, num_classes: int, in_channels: int, image_size: tuple[int, int]
) -> nn.Module:
    """``factory(num_classes=..., channels=..., image_size=...)`` of ``module:factory``.
    Raises ValueError naming the path and what went wrong."""
    module_name, _, factory_name = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model {path!r}: cannot import it ({type(err).__name__}: {err})") from err
    try:
        model = factory(num_classes=num_classes, channels=in_channels, image_size=image_size)
    except Exception as err:
        raise ValueError(f"model {path!r}: its factory raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model {path!r}: its factory returned a {type(model).__name__}, not a module"
        )
    return model


def state_layout(state: Mapping[str, Tensor]) -> list[str]:
    """A state dict as WASH sees it: ``name:shape`` of every entry, in order. Members must
    agree on it to exchange values at the same coordinates."""
    return [f"{name}:{tuple(t.shape)}" for name, t in state.items()]


def model_layout(model: nn.Module) -> list[str]:
    """:func:`state_layout` of ``model``'s state dict."""
    return state_layout(model.state_dict())


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: tuple[int, int]
) -> nn.Module:
    """A freshly initialised model, drawn from the current torch RNG."""
    if (problem := model_problem(name)) is not None:
        raise ValueError(problem)
    if name == "cnn":
        return SmallCNN(num_classes, in_channels, image_size)
    if name == "cnn-wide":
        return SmallCNN(num_classes, in_channels, image_size, hidden=WIDE_CNN_HIDDEN)
    if name == "resnet18":
        return resnet18_cifar(num_classes, in_channels)
    if not name.startswith(TORCHVISION_PREFIX):
        return _from_import_path(name, num_classes, in_channels, image_size)
    import torchvision.models as tvm

    model: nn.Module = tvm.get_model(
        name.removeprefix(TORCHVISION_PREFIX), weights=None, num_classes=num_classes
    )
    if in_channels == 1:
        return nn.Sequential(_RepeatChannels(), model)
    if in_channels != 3:
        raise ValueError(f"model {name!r} takes 1 or 3 input channels, got {in_channels}")
    return model
