"""A task and a model the project does not ship: a model by import path, a task described by
configuration, and the errors that name what is wrong with either."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from examples.custom_task.make_images import main as make_images
from wash_fed.config import ConfigError, WashFedConfig
from wash_fed.data import load_local
from wash_fed.models import build_model, model_layout
from wash_fed.training import load_test_data, load_training_data, new_model

TASK = {
    "dataset": "images",
    "num-classes": 5,
    "channels": 3,
    "image-size": "24x40",
    "model": "examples.custom_task.tinynet:build",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    assert make_images([str(out), "--nodes", "2", "--train", "300", "--test", "100"]) == 0
    return out


def test_a_model_by_import_path_is_built_for_the_task() -> None:
    model = build_model("examples.custom_task.tinynet:build", 5, 3, (24, 40))
    assert model(torch.zeros(2, 3, 24, 40)).shape == (2, 5)
    assert model_layout(model)[0] == "features.0.weight:(16, 3, 3, 3)"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("examples.custom_task.nowhere:build", "cannot import it (ModuleNotFoundError"),
        ("examples.custom_task.tinynet:nothing", "cannot import it (AttributeError"),
        ("examples.custom_task.tinynet:TinyNet", "its factory raised TypeError"),
        ("torch:zeros", "its factory raised TypeError"),
        ("math:hypot", "its factory raised TypeError"),
    ],
)
def test_a_model_that_cannot_be_built_names_its_path_and_why(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"model '{path}': {message}")):
        build_model(path, 5, 3, (24, 40))


def test_a_factory_must_return_a_module() -> None:
    with pytest.raises(ValueError, match="returned a dict, not a module"):
        build_model("builtins:dict", 5, 3, (24, 40))


def test_a_task_by_configuration_trains_on_its_files(images: Path) -> None:
    cfg = WashFedConfig.from_mapping(
        {**TASK, "train-path": str(images / "train.pt"), "test-path": str(images / "test.pt"),
         "holdout-size": 50, "batch-size": 32}
    )  # fmt: skip
    data, test = load_training_data(cfg), load_test_data(cfg)
    assert data.train.images.shape[1:] == (3, 24, 40) and len(test) == 200
    assert len(data.train) + 50 == 600
    model = new_model(cfg)
    x, y = data.train.batch(torch.arange(8))
    assert model(x).shape == (8, 5) and int(y.max()) < 5
    mean, std = data.train.mean, data.train.std
    assert len(mean) == len(std) == 3 and all(0 < s < 1 for s in std)  # from the images


def test_given_normalisation_applies_and_files_must_fit_the_task(images: Path) -> None:
    given = WashFedConfig.from_mapping(
        {**TASK, "image-mean": "0.5,0.5,0.5", "image-std": "0.25,0.25,0.25"}
    )
    loaded = load_local(images / "test.pt", given.data.task)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)
    other = WashFedConfig.from_mapping({**TASK, "image-size": "32"})
    with pytest.raises(ValueError, match=r"shape \(3, 24, 40\); images needs \(3, 32, 32\)"):
        load_local(images / "test.pt", other.data.task)
    fewer = WashFedConfig.from_mapping({**TASK, "num-classes": 3})
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        load_local(images / "test.pt", fewer.data.task)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dataset": "images"}, "num-classes must be >= 2"),
        ({**TASK, "image-size": "24y40"}, "image-size must be 'HxW' or 'N'"),
        ({**TASK, "image-mean": "0.5"}, "image-mean and image-std go together"),
        (
            {**TASK, "image-mean": "0.5", "image-std": "0.2"},
            "image-mean has 1 values for channels=3",
        ),
        ({**TASK, "image-mean": "0,0,0", "image-std": "1,0,1"}, "image-std must be > 0"),
        ({"num-classes": 5}, "num-classes describe dataset='images'; fashion-mnist has its own"),
        ({"model": "not a path"}, "unknown model 'not a path'"),
    ],
)
def test_a_task_badly_described_is_named_before_anything_runs(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        WashFedConfig.from_mapping(values)


def test_a_task_without_its_files_names_the_key_to_set() -> None:
    cfg = WashFedConfig.from_mapping(TASK)
    with pytest.raises(FileNotFoundError, match="dataset='images' needs train-path"):
        load_training_data(cfg)
