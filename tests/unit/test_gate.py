"""The reply gate on plain tensors: form, magnitude against the population, metrics,
BatchNorm statistics, quarantine."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wash_fed.batchnorm import BNStatistics, running_statistics
from wash_fed.gate import (
    Quarantine,
    ReplyGate,
    all_finite,
    capped_batches,
    check_bn_statistics,
    check_metrics,
    check_model,
    check_tensors,
    check_values,
    magnitude_outliers,
)
from wash_fed.gate import _lower_median as lower_median

REFERENCE = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "n": torch.zeros((), dtype=torch.long)}


def honest(member: int, spread: float = 0.01) -> dict[str, torch.Tensor]:
    """Weights near a shared value, each member a little different."""
    generator = torch.Generator().manual_seed(member)
    return {
        "w": 0.5 + spread * torch.randn(4, 3, generator=generator),
        "b": -0.2 + spread * torch.randn(3, generator=generator),
        "n": torch.tensor(7),
    }


def test_form_names_shapes_dtypes_and_finiteness() -> None:
    assert check_tensors(honest(0), REFERENCE) is None
    assert "unexpected ['x']" in str(check_tensors({**honest(0), "x": torch.zeros(1)}, REFERENCE))
    assert "missing ['b']" in str(
        check_tensors({"w": honest(0)["w"], "n": REFERENCE["n"]}, REFERENCE)
    )
    wide = {**honest(0), "w": honest(0)["w"].double()}
    assert "torch.float64" in str(check_tensors(wide, REFERENCE))
    nan = {**honest(0), "b": torch.tensor([0.0, math.nan, 0.0])}
    assert "non-finite" in str(check_tensors(nan, REFERENCE))
    assert check_values({"weights": torch.ones(5)}, ["weights"], 5, torch.float32) is None
    assert "shape (6,)" in str(
        check_values({"weights": torch.ones(6)}, ["weights"], 5, torch.float32)
    )
    assert "kinds" in str(check_values({"weight": torch.ones(5)}, ["weights"], 5, torch.float32))


@pytest.mark.parametrize(
    ("fault", "flagged"),
    [
        (lambda p: {**p, "w": p["w"] * 1000}, True),
        (lambda p: {**p, "b": torch.full((3,), 1e30)}, True),
        (lambda p: {**p, "w": p["w"] + 0.01}, False),  # within the members' own spread
    ],
    ids=["scaled", "huge", "ordinary"],
)
def test_a_member_far_from_the_population_is_an_outlier(fault: object, flagged: bool) -> None:
    payloads = {m: honest(m) for m in range(4)}
    payloads[2] = fault(payloads[2])  # type: ignore[operator]
    outliers = magnitude_outliers(payloads, factor=50)
    assert (2 in outliers) is flagged and set(outliers) <= {2}


def test_members_from_different_initialisations_are_not_outliers() -> None:
    payloads = {m: honest(m, spread=1.0) for m in range(5)}
    assert magnitude_outliers(payloads, factor=50) == {}


def test_members_nearly_equal_at_most_coordinates_are_not_outliers() -> None:
    """A shared initialisation early in training: the members agree to 1e-7 almost
    everywhere and differ by 1e-2 at one coordinate in a hundred. None is far from the
    others; one of them scaled x1000 is."""
    generator = torch.Generator().manual_seed(0)
    start = 0.02 * torch.randn(20_000, generator=generator)
    moved = torch.rand(20_000, generator=generator) < 0.01

    def member() -> dict[str, torch.Tensor]:
        noise = torch.randn(20_000, generator=generator)
        return {"weights": start + torch.where(moved, 1e-2, 1e-7) * noise}

    payloads = {m: member() for m in range(3)}
    assert magnitude_outliers(payloads, factor=50) == {}
    payloads[1] = {"weights": payloads[1]["weights"] * 1000}
    assert set(magnitude_outliers(payloads, factor=50)) == {1}


def test_two_close_members_do_not_make_the_other_two_outliers() -> None:
    """Non-IID BatchNorm means: two members with similar label mixes agree to 1e-3; the
    other two see brighter images, which shifts every channel's mean the same way, by 0.3
    and 0.6. All four are honest; a member scaled x1000 is not."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(32, generator=generator)

    def member(shift: float) -> dict[str, torch.Tensor]:
        return {"mean": base + shift + 1e-3 * torch.randn(32, generator=generator)}

    payloads = {m: member(shift) for m, shift in enumerate([0.0, 0.0, 0.3, 0.6])}
    assert magnitude_outliers(payloads, factor=50) == {}
    payloads[3] = {"mean": payloads[3]["mean"] * 1000}
    assert set(magnitude_outliers(payloads, factor=50)) == {3}


@pytest.mark.parametrize(
    ("fault", "flagged"),
    [
        (lambda w: -w, True),
        (torch.zeros_like, True),
        (lambda w: 2 * w, True),
        (lambda w: 1.3 * w, False),  # a scaled copy inside the floor passes
    ],
    ids=["negated", "zeroed", "doubled", "x1.3"],
)
def test_values_that_point_elsewhere_are_outliers(fault: object, flagged: bool) -> None:
    """Members spread as widely as their values are large: a negated or zeroed copy is not
    far from the median in distance, but its projection on the median is about -1 or 0
    where the others' are about 1."""
    generator = torch.Generator().manual_seed(0)
    base = 0.05 * torch.randn(5000, generator=generator)
    payloads = {
        m: {"weights": base + 0.03 * torch.randn(5000, generator=generator)} for m in range(4)
    }
    assert magnitude_outliers(payloads, factor=50) == {}
    payloads[1] = {"weights": fault(payloads[1]["weights"])}  # type: ignore[operator]
    outliers = magnitude_outliers(payloads, factor=50)
    assert set(outliers) == ({1} if flagged else set())
    assert all("points elsewhere" in reason for reason in outliers.values())


def test_running_statistics_are_judged_by_distance_only() -> None:
    """A BatchNorm running variance at 1.6 times the others' (a member whose data vary
    more) points where theirs do, only longer: judged by direction it would be rejected;
    as a statistic it is not, while a negated weight in the same reply still is."""
    generator = torch.Generator().manual_seed(0)

    def member(scale: float) -> dict[str, torch.Tensor]:
        var = scale * (1.0 + 0.02 * torch.randn(512, generator=generator))
        weight = 0.05 + 0.03 * torch.randn(512, generator=generator)
        return {"bn.running_var": var, "bn.weight": weight}

    payloads = {m: member(scale) for m, scale in enumerate([1.0, 1.02, 0.98, 1.6])}
    assert set(magnitude_outliers(payloads, factor=50)) == {3}
    statistics = running_statistics({**payloads[0], "bn.running_mean": torch.zeros(512)})
    assert statistics == {"bn.running_mean", "bn.running_var"}
    assert magnitude_outliers(payloads, factor=50, statistics=statistics) == {}
    payloads[1] = {**payloads[1], "bn.weight": -payloads[1]["bn.weight"]}
    outliers = magnitude_outliers(payloads, factor=50, statistics=statistics)
    assert set(outliers) == {1}
    assert "'bn.weight' points elsewhere" in outliers[1]


def test_a_whole_model_needs_its_form_and_non_negative_running_variances() -> None:
    reference = {
        "bn.weight": torch.ones(4),
        "bn.running_mean": torch.zeros(4),
        "bn.running_var": torch.ones(4),
    }
    assert check_model(reference, reference) is None
    without_weight = {k: v for k, v in reference.items() if k != "bn.weight"}
    assert "missing ['bn.weight']" in str(check_model(without_weight, reference))
    negated = {**reference, "bn.running_var": -reference["bn.running_var"]}
    assert "negative BatchNorm running variances in ['bn.running_var']" in str(
        check_model(negated, reference)
    )


def test_independent_members_are_not_judged_by_direction() -> None:
    """Members from different initialisations share no direction: none is an outlier,
    whatever the size of their tensors."""
    generator = torch.Generator().manual_seed(0)
    payloads = {m: {"weights": torch.randn(20_000, generator=generator)} for m in range(5)}
    assert magnitude_outliers(payloads, factor=50) == {}


def test_two_members_have_no_majority_to_judge_by() -> None:
    payloads = {0: honest(0), 1: {**honest(1), "w": honest(1)["w"] * 1000}}
    assert magnitude_outliers(payloads, factor=50) == {}


def test_metrics_must_be_finite_in_range_and_few() -> None:
    assert check_metrics({"loss": 0.3, "train-accuracy": 0.9, "num-examples": 64}) is None
    assert "outside" in str(check_metrics({"test-accuracy": 1.5}))
    assert "outside" in str(check_metrics({"loss": math.inf}))
    assert check_metrics({"bonus": 1.5, "loss": 0.3}) is None  # a task's own figure
    assert "'bonus' is inf, outside" in str(check_metrics({"bonus": math.inf}))
    assert "more than 64" in str(check_metrics({f"m{i}": 0.0 for i in range(65)}))
    assert "characters long" in str(check_metrics({"x" * 65: 0.0}))
    assert "not a number" in str(check_metrics({"loss": True}))


def test_batchnorm_statistics_and_the_weight_a_member_may_claim() -> None:
    reference = BNStatistics({"bn": torch.zeros(3)}, {"bn": torch.ones(3)}, 1)
    good = BNStatistics({"bn": torch.rand(3)}, {"bn": torch.rand(3)}, 4)
    assert check_bn_statistics(good, reference) is None
    negative = BNStatistics({"bn": torch.rand(3)}, {"bn": -torch.ones(3)}, 4)
    assert "negative" in str(check_bn_statistics(negative, reference))
    wrong = BNStatistics({"bn2": torch.rand(3)}, {"bn2": torch.rand(3)}, 4)
    assert "means" in str(check_bn_statistics(wrong, reference))
    assert capped_batches(10**9, examples=1000, batch_size=128, bn_batches=50) == 8
    assert capped_batches(3, examples=1000, batch_size=128, bn_batches=50) == 3


def test_quarantine_after_a_streak_of_rejections() -> None:
    quarantine = Quarantine(limit=2)
    assert not quarantine.rejected(1)
    quarantine.accepted(1)  # the streak starts over
    assert not quarantine.rejected(1)
    assert quarantine.rejected(1) and quarantine.quarantined == {1}


def test_the_pipeline_checks_form_then_magnitude_and_logs_each_member_left_out() -> None:
    lines: list[str] = []
    gate = ReplyGate(outlier_factor=50, log=lines.append)
    payloads = {m: honest(m) for m in range(5)}
    payloads[1] = {**honest(1), "b": torch.tensor([0.0, math.nan, 0.0])}  # wrong form
    payloads[3] = {k: v * 1000 if v.is_floating_point() else v for k, v in honest(3).items()}
    admission = gate.admit(
        payloads,
        lambda p: check_tensors(p, REFERENCE),
        what="round 2",
        earlier={4: "records ['metrics'], expected ['arrays', 'metrics']"},
    )
    assert list(admission.accepted) == [0, 2]
    assert set(admission.rejected) == {1, 3, 4} and "non-finite" in admission.rejected[1]
    assert "typical distance" in admission.rejected[3], "judged against 0 and 2 only"
    assert lines == [f"member {m} rejected (round 2): {admission.rejected[m]}" for m in (1, 3, 4)]


def test_the_pipeline_counts_rejections_and_errors_toward_quarantine() -> None:
    lines: list[str] = []
    gate = ReplyGate(outlier_factor=50, log=lines.append)
    quarantine = Quarantine(limit=2)
    payloads = {m: honest(m) for m in range(3)}

    def round_(errored: set[int], broken: set[int]) -> list[int]:
        sent = {m: ({} if m in broken else p) for m, p in payloads.items() if m not in errored}
        admission = gate.admit(
            sent,
            lambda p: check_tensors(p, REFERENCE),
            what="a round",
            quarantine=quarantine,
            errored=errored,
        )
        return admission.quarantined

    assert round_(errored={2}, broken=set()) == []  # member 2's own error counts once
    assert round_(errored=set(), broken={2}) == [2]  # and a rejection makes two in a row
    assert lines[-1] == "member 2 quarantined after 2 rejected or failed replies in a row"
    assert round_(errored=set(), broken={1}) == [] and quarantine.streaks == {1: 1}
    assert quarantine.quarantined == {2}, "for the rest of the run"
    assert round_(errored=set(), broken=set()) == [] and 1 not in quarantine.streaks


@given(
    members=st.integers(1, 80),
    coordinates=st.integers(1, 300),
    levels=st.integers(2, 1000),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
@settings(max_examples=90, deadline=None)
def test_the_gates_median_is_torchs_lower_median(
    members: int, coordinates: int, levels: int, dtype: torch.dtype
) -> None:
    # few levels: ties, as among members that share an initialisation; both signs, and
    # 16-bit floats through their integer keys
    generator = torch.Generator().manual_seed(members * 1000 + coordinates)
    steps = torch.randint(levels, (members, coordinates), generator=generator)
    chunk = ((steps - levels // 2) / 7).to(dtype)
    median = lower_median(chunk)
    assert median.dtype == dtype and torch.equal(median, chunk.median(dim=0).values)


@pytest.mark.parametrize("members", range(1, 11))
def test_the_gates_median_selects_right_on_every_zero_one_input(members: int) -> None:
    # a comparator network that selects right on all 0/1 inputs selects right on all inputs
    every = torch.tensor(
        [[(code >> bit) & 1 for code in range(2**members)] for bit in range(members)]
    ).float()
    assert torch.equal(lower_median(every), every.median(dim=0).values)


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        (torch.tensor([1.0, -2.0]), True),
        (torch.tensor([1.0, math.nan]), False),
        (torch.tensor([math.inf, -math.inf]), False),
        (torch.tensor([3e38, 3e38, -1.0]), True),  # its float32 sum overflows
        (torch.tensor([60000.0, 60000.0]).half(), True),
        (torch.tensor([1e300, -1e300], dtype=torch.float64), True),
        (torch.tensor([7, 8]), True),
    ],
)
def test_finiteness_is_every_values(values: torch.Tensor, finite: bool) -> None:
    assert all_finite(values) is finite
