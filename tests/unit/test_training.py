"""Models, one member's training and its resumable state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wash_fed.config import WashFedConfig
from wash_fed.models import build_model
from wash_fed.training import Member, TrainingData, load_training_data

SMALL = {
    "train-subset": 2000,
    "holdout-size": 200,
    "num-members": 2,
    "num-server-rounds": 4,
    "local-steps": 5,
    "batch-size": 32,
}


@pytest.fixture(scope="module")
def small_data() -> TrainingData:
    return load_training_data(WashFedConfig.from_mapping(SMALL))


def cfg(**overrides: object) -> WashFedConfig:
    return WashFedConfig.from_mapping(
        {**SMALL, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    )


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [
        ("cnn", 1, (28, 28)),
        ("cnn-wide", 1, (28, 28)),
        ("resnet18", 3, (32, 32)),
        ("torchvision:resnet18", 1, (28, 28)),
    ],
)
def test_models_build_and_classify(name: str, channels: int, size: tuple[int, int]) -> None:
    model = build_model(name, 10, channels, size).eval()
    assert model(torch.zeros(2, channels, *size)).shape == (2, 10)


def test_wide_cnn_is_a_few_megabytes_in_its_head() -> None:
    small, wide = (build_model(n, 10, 1, (28, 28)) for n in ("cnn", "cnn-wide"))
    count = sum(p.numel() for p in wide.parameters())
    assert 1.5e6 < count < 1.7e6  # 6.5 MB in float32
    assert count > 10 * sum(p.numel() for p in small.parameters())
    assert [n for n, _ in wide.named_parameters()] == [n for n, _ in small.named_parameters()]


def test_unknown_models_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'mlp'"):
        build_model("mlp", 10, 1, (28, 28))
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        build_model("torchvision:fasterrcnn_resnet50_fpn", 10, 3, (32, 32))


def test_resnet18_cifar_form() -> None:
    model = build_model("resnet18", 10, 3, (32, 32))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)  # type: ignore[union-attr]
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_initialisations_differ_or_are_shared(small_data: TrainingData) -> None:
    a, b = (
        Member(cfg(init="different"), i, small_data.member(i), torch.device("cpu"))
        for i in range(2)
    )
    assert not torch.equal(a.parameters()[0], b.parameters()[0])
    c, d = (
        Member(cfg(init="shared"), i, small_data.member(i), torch.device("cpu")) for i in range(2)
    )
    assert all(torch.equal(x, y) for x, y in zip(c.parameters(), d.parameters(), strict=True))
    assert not np.array_equal(c.stream.next(), d.stream.next())  # own data order


def test_member_resumes_bit_for_bit(small_data: TrainingData) -> None:
    straight = Member(cfg(), 1, small_data.member(1), torch.device("cpu"))
    straight.train_steps(5)
    straight.train_steps(5)

    first = Member(cfg(), 1, small_data.member(1), torch.device("cpu"))
    first.train_steps(5)
    saved, loop = first.state_dict(), first.loop_state()
    resumed = Member(cfg(), 1, small_data.member(1), torch.device("cpu"))
    resumed.load_state_dict(saved)
    resumed.load_loop_state(loop)
    stats = resumed.train_steps(5)
    assert stats.steps == 5 and stats.examples == 160
    for x, y in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y)


def test_training_learns_and_refuses_to_run_past_the_schedule(small_data: TrainingData) -> None:
    member = Member(
        cfg(lr_schedule="constant", lr=0.05), 0, small_data.member(0), torch.device("cpu")
    )
    first = member.train_steps(5)
    for _ in range(3):
        last = member.train_steps(5)
    assert last.loss < first.loss
    with pytest.raises(RuntimeError, match="past its 20 scheduled steps"):
        member.train_steps(1)


def test_diverging_training_is_reported(small_data: TrainingData) -> None:
    member = Member(
        cfg(lr_schedule="constant", lr=1e6), 0, small_data.member(0), torch.device("cpu")
    )
    with pytest.raises(FloatingPointError, match="lower lr"):
        member.train_steps(20)


def test_too_little_data_per_member_is_a_clear_error(small_data: TrainingData) -> None:
    with pytest.raises(ValueError, match="fewer than batch-size"):
        load_training_data(cfg(partition="iid", num_members=4, train_subset=400, batch_size=128))
    with pytest.raises(ValueError, match="batch-size=4096 is more than member 0's 1800 training"):
        Member(cfg(batch_size=4096), 0, small_data.member(0), torch.device("cpu"))


def test_holdout_is_disjoint_from_training_data(small_data: TrainingData) -> None:
    assert small_data.holdout is not None and len(small_data.holdout) == 200
    assert len(small_data.train) == 1800
    train_rows = {bytes(img.numpy()) for img in small_data.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in small_data.holdout.images[:50])
