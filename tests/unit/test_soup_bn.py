"""Soups, BatchNorm recalibration and evaluation."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from wash_fed import wire
from wash_fed.batchnorm import (
    bn_layers_of,
    bn_statistics,
    merge_bn_statistics,
    with_bn_statistics,
)
from wash_fed.evaluation import accuracy
from wash_fed.models import SmallCNN
from wash_fed.soup import greedy_soup, uniform_soup


def models(n: int) -> list[nn.Module]:
    out: list[nn.Module] = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(SmallCNN())
    return out


def test_uniform_soup_is_the_entrywise_mean() -> None:
    sds = [m.state_dict() for m in models(3)]
    soup = uniform_soup(sds)
    for key, value in soup.items():
        if value.is_floating_point():
            expected = (sds[0][key].double() + sds[1][key].double() + sds[2][key].double()) / 3
            assert torch.allclose(value.double(), expected, atol=1e-7)
        else:
            assert torch.equal(value, sds[0][key])
    assert uniform_soup(sds[:1]).keys() == sds[0].keys()


def test_uniform_soup_rejects_mismatched_ingredients() -> None:
    a = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="shape"):
        uniform_soup([a, {"w": torch.ones(4)}])
    with pytest.raises(ValueError, match="different entries"):
        uniform_soup([a, {"v": torch.ones(3)}])
    with pytest.raises(ValueError, match="at least one"):
        uniform_soup([])


def test_greedy_soup_keeps_only_ingredients_that_help() -> None:
    # Score: closeness of the soup's single weight to 1.0.
    sds = [{"w": torch.tensor([v])} for v in (0.9, 1.05, 3.0, 1.2)]

    def score(sd: Mapping[str, torch.Tensor]) -> float:
        return -abs(float(sd["w"]) - 1.0)

    result = greedy_soup(sds, score)
    assert result.ingredients[0] == 1  # the best member first
    assert 2 not in result.ingredients  # 3.0 would hurt
    assert result.score >= max(result.member_scores)


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 28, 28, generator=g) * 2 + 0.5 for _ in range(n)]


def test_merged_statistics_equal_statistics_over_all_batches() -> None:
    model = SmallCNN()
    first, second = _batches(3, 0), _batches(5, 1)
    merged = merge_bn_statistics([bn_statistics(model, first), bn_statistics(model, second)])
    whole = bn_statistics(model, first + second)
    assert merged.batches == whole.batches == 8
    for name in whole.means:
        assert torch.allclose(merged.means[name], whole.means[name], atol=1e-6)
        assert torch.allclose(merged.variances[name], whole.variances[name], atol=1e-6)


def test_bn_statistics_cross_the_wire_exactly() -> None:
    stats = bn_statistics(SmallCNN(), _batches(2, 0))
    record = wire.bn_statistics_to_record(stats)
    back = wire.tensors_to_bn_statistics(wire.record_to_tensors(record), stats.batches)
    assert back.batches == stats.batches
    assert back.means.keys() == stats.means.keys() == back.variances.keys()
    for name in stats.means:
        assert torch.equal(back.means[name], stats.means[name])
        assert torch.equal(back.variances[name], stats.variances[name])


def test_bn_statistics_leave_the_model_untouched_and_a_state_dict_takes_them() -> None:
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = bn_statistics(model, _batches(2, 0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    bn = model.features[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.momentum == 0.1  # restored
    assert not torch.allclose(stats.means["features.1"], bn.running_mean)  # type: ignore[arg-type]
    layers = bn_layers_of(model.state_dict())
    assert layers.means.keys() == stats.means.keys() == {"features.1", "features.5"}
    model.load_state_dict(with_bn_statistics(model.state_dict(), stats))
    assert torch.equal(stats.means["features.1"], bn.running_mean)  # type: ignore[arg-type]
    assert int(bn.num_batches_tracked) == 2  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers"):
        with_bn_statistics(nn.Sequential(nn.BatchNorm1d(3)).state_dict(), stats)


def test_accuracy() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(probs, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
