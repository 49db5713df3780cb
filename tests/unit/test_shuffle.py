"""Properties of the WASH shuffle (wash_fed.shuffle)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wash_fed.shuffle import (
    PERMUTATION_CHUNK,
    draw_ahead,
    draw_permutations,
    event_mask,
    gather,
    layer_probs,
    permute,
    scatter,
    shuffle_population,
    shuffle_values,
)

SHAPES = [(7, 3), (5,), (4, 2, 3), (1,)]


def make_population(
    n: int, shapes: list[tuple[int, ...]], seed: int = 0
) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(n)]


def clone(pop: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in m] for m in pop]


def run_shuffle(
    pop: list[list[torch.Tensor]],
    p: float,
    *,
    seed: int = 1,
    event: int = 1,
    schedule: str = "constant",
) -> tuple[list[list[torch.Tensor]], int, int]:
    shapes_numel = [t.numel() for t in pop[0]]
    probs = layer_probs(p, len(shapes_numel), schedule)  # type: ignore[arg-type]
    mask = event_mask(shapes_numel, probs, seed=seed, event=event)
    out = clone(pop)
    count = shuffle_population([{"weights": m} for m in out], mask, seed=seed, event=event)
    return out, count.selected, count.moved


# --- layer schedules -------------------------------------------------------------------


def test_linear_schedule_goes_from_p_to_zero() -> None:
    assert layer_probs(0.1, 5, "linear") == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])
    assert layer_probs(0.1, 1, "linear") == [0.1]
    assert layer_probs(0.3, 3, "constant") == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("p", [-0.1, 1.5, math.nan])
def test_schedule_rejects_probabilities_outside_unit_interval(p: float) -> None:
    with pytest.raises(ValueError, match="shuffle_prob"):
        layer_probs(p, 3, "linear")


def test_unknown_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="layer schedule"):
        layer_probs(0.1, 3, "cubic")  # type: ignore[arg-type]


# --- masks ------------------------------------------------------------------------------


def test_mask_is_deterministic_and_depends_on_seed_and_event() -> None:
    numels, probs = [1000, 500], [0.2, 0.1]
    a = event_mask(numels, probs, seed=3, event=7)
    b = event_mask(numels, probs, seed=3, event=7)
    assert a.digest() == b.digest()
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert event_mask(numels, probs, seed=3, event=8).digest() != a.digest()
    assert event_mask(numels, probs, seed=4, event=7).digest() != a.digest()


def test_mask_indices_are_sorted_unique_and_in_range() -> None:
    mask = event_mask([10_000, 3], [0.3, 1.0], seed=0, event=2)
    for idx, n in zip(mask.indices, [10_000, 3], strict=True):
        assert idx.dtype == torch.int64
        assert bool((idx[1:] > idx[:-1]).all())  # strictly increasing: sorted, no repeats
        assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert torch.equal(mask.indices[1], torch.arange(3))  # p = 1 selects everything


@pytest.mark.parametrize("p", [0.001, 0.01, 0.3])
def test_selected_fraction_is_within_five_sigma_of_p(p: float) -> None:
    n = 200_000
    for event in range(5):
        k = event_mask([n], [p], seed=11, event=event).num_selected
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(k - n * p) < 5 * sigma, (k, n * p, sigma)


def test_linear_schedule_selects_less_in_later_tensors() -> None:
    n, layers = 100_000, 5
    probs = layer_probs(0.2, layers, "linear")
    mask = event_mask([n] * layers, probs, seed=0, event=1)
    for size, p in zip(mask.sizes, probs, strict=True):
        assert abs(size - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1e-9
    assert mask.sizes[-1] == 0


def test_two_processes_derive_identical_masks() -> None:
    code = (
        "from wash_fed.shuffle import event_mask, layer_probs;"
        "m = event_mask([123456, 789, 50000], layer_probs(0.05, 3, 'linear'), seed=42, event=9);"
        "print(m.digest(), m.num_selected)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    here = event_mask([123456, 789, 50000], layer_probs(0.05, 3, "linear"), seed=42, event=9)
    assert out == [here.digest(), str(here.num_selected)]
    assert here.num_selected > 0


def test_negative_seed_or_event_is_an_error() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        event_mask([10], [0.5], seed=-1, event=0)


# --- permutations ------------------------------------------------------------------------


@given(n=st.integers(1, 10), m=st.integers(0, 200), seed=st.integers(0, 2**32))
@settings(max_examples=50, deadline=None)
def test_every_column_is_a_permutation(n: int, m: int, seed: int) -> None:
    perms = draw_permutations(n, m, seed=seed, event=1)
    assert perms.shape == (n, m)
    assert torch.equal(perms.sort(dim=0).values, torch.arange(n)[:, None].expand(n, m))


def test_permutations_are_uniform() -> None:
    n, m = 3, 60_000
    perms = draw_permutations(n, m, seed=5, event=1)
    codes = perms[0] * 9 + perms[1] * 3 + perms[2]
    counts = torch.bincount(codes, minlength=27)
    counts = counts[counts > 0]
    assert len(counts) == math.factorial(n)
    expected = m / math.factorial(n)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0  # 5 degrees of freedom: p ~ 1e-4


def test_a_large_populations_positions_are_uniform_and_independent_of_the_count() -> None:
    n, m = 20, 40_000
    perms = draw_permutations(n, m, seed=3, event=2)
    counts = torch.bincount(perms[0], minlength=n).double()
    chi2 = float(((counts - m / n) ** 2 / (m / n)).sum())
    assert chi2 < 50.0  # 19 degrees of freedom: p ~ 1e-4
    assert torch.equal(draw_permutations(n, 1000, seed=3, event=2), perms[:, :1000])


@pytest.mark.parametrize("in_place", [False, True])
def test_the_exchange_applies_the_drawn_permutations_to_every_kind(in_place: bool) -> None:
    n, m = 5, 2 * PERMUTATION_CHUNK + 7  # across chunks
    g = torch.Generator().manual_seed(0)
    values = [
        {"weights": torch.randn(m, generator=g), "momentum_buffer": torch.randn(m, generator=g)}
        for _ in range(n)
    ]
    given = [{kind: t.clone() for kind, t in v.items()} for v in values]
    received, moved = shuffle_values(given, seed=9, event=4, in_place=in_place)
    perms = draw_permutations(n, m, seed=9, event=4)
    for kind in ("weights", "momentum_buffer"):
        expected = permute(torch.stack([v[kind] for v in values]), perms)
        assert torch.equal(torch.stack([r[kind] for r in received]), expected)
        # in place: what each member receives is written over what it sent
        assert all((r[kind] is s[kind]) == in_place for r, s in zip(received, given, strict=True))
        assert torch.equal(
            torch.stack([s[kind] for s in given]),
            expected if in_place else torch.stack([v[kind] for v in values]),
        )
    assert moved == int((perms != torch.arange(n)[:, None]).sum())


def test_permutations_drawn_ahead_exchange_as_those_drawn_there() -> None:
    n, m = 6, PERMUTATION_CHUNK + 11
    g = torch.Generator().manual_seed(1)
    values = [{"weights": torch.randn(m, generator=g).half()} for _ in range(n)]
    here = shuffle_values(values, seed=2, event=3)
    ahead = shuffle_values(values, seed=2, event=3, drawn=draw_ahead(n, m, seed=2, event=3))
    assert ahead.moved == here.moved
    for mine, theirs in zip(ahead.received, here.received, strict=True):
        assert torch.equal(mine["weights"], theirs["weights"])
    drawn = draw_ahead(n, m, seed=2, event=3)
    assert drawn.indices.dtype == torch.uint8
    assert torch.equal(drawn.indices.long(), draw_permutations(n, m, seed=2, event=3))
    for wrong in (draw_ahead(n, m, seed=2, event=4), draw_ahead(n - 1, m, seed=2, event=3)):
        with pytest.raises(ValueError, match="permutations drawn for"):
            shuffle_values(values, seed=2, event=3, drawn=wrong)


def test_a_non_finite_value_names_its_member_unless_the_gate_checked_them() -> None:
    values = [{"weights": torch.zeros(10)} for _ in range(3)]
    values[2]["weights"][7] = math.nan
    with pytest.raises(ValueError, match="member 2 sent non-finite"):
        shuffle_values(values, seed=0, event=1)
    received, _ = shuffle_values(values, seed=0, event=1, gated=True)
    assert sum(int(r["weights"].isnan().sum()) for r in received) == 1


def test_permute_moves_values_along_the_member_axis() -> None:
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    perms = torch.tensor([[2, 0], [0, 1], [1, 2]])
    assert torch.equal(
        permute(values, perms), torch.tensor([[3.0, 10.0], [1.0, 20.0], [2.0, 30.0]])
    )
    with pytest.raises(ValueError, match="do not match"):
        permute(values, perms[:, :1])


# --- the shuffle of a population ---------------------------------------------------------


@given(
    n=st.integers(1, 6),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    event=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_shuffle_keeps_every_coordinates_multiset_and_the_mean(
    n: int, p: float, seed: int, event: int
) -> None:
    before = make_population(n, SHAPES, seed=seed % 1000)
    after, _, _ = run_shuffle(before, p, seed=seed, event=event, schedule="linear")
    for l in range(len(SHAPES)):
        a = torch.stack([m[l] for m in before]).sort(dim=0).values
        b = torch.stack([m[l] for m in after]).sort(dim=0).values
        assert torch.equal(a, b)
        assert torch.equal(a.mean(0), b.mean(0))  # the population mean, exactly


@given(n=st.integers(2, 6), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_unselected_coordinates_never_change(n: int, p: float, seed: int) -> None:
    before = make_population(n, SHAPES, seed=1)
    numels = [math.prod(s) for s in SHAPES]
    mask = event_mask(numels, [p] * len(SHAPES), seed=seed, event=3)
    after, _, _ = run_shuffle(before, p, seed=seed, event=3)
    for i in range(n):
        for l, idx in enumerate(mask.indices):
            keep = torch.ones(numels[l], dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(before[i][l].reshape(-1)[keep], after[i][l].reshape(-1)[keep])


def test_p_zero_and_single_member_are_no_ops() -> None:
    pop = make_population(4, SHAPES)
    after, selected, moved = run_shuffle(pop, 0.0)
    assert selected == 0 and moved == 0
    assert all(
        torch.equal(a, b)
        for m, n in zip(pop, after, strict=True)
        for a, b in zip(m, n, strict=True)
    )
    single = make_population(1, SHAPES)
    after, selected, moved = run_shuffle(single, 1.0)
    assert selected == sum(math.prod(s) for s in SHAPES) and moved == 0
    assert all(torch.equal(a, b) for a, b in zip(single[0], after[0], strict=True))


def test_p_one_selects_every_coordinate() -> None:
    pop = make_population(3, SHAPES)
    _, selected, _ = run_shuffle(pop, 1.0)
    assert selected == sum(math.prod(s) for s in SHAPES)


def test_moved_fraction_is_p_times_one_minus_one_over_n() -> None:
    n, size, p = 4, 100_000, 0.1
    pop = [[torch.full((size,), float(i))] for i in range(n)]
    after, selected, moved = run_shuffle(pop, p, seed=2, event=5)
    # A value moved iff it differs from its member's own constant.
    changed = sum(int((after[i][0] != i).sum()) for i in range(n))
    assert changed == moved
    expected = n * size * p * (1 - 1 / n)
    assert abs(moved - expected) < 5 * math.sqrt(expected)
    assert abs(selected - size * p) < 5 * math.sqrt(size * p)


def test_same_seed_same_result_other_seed_other_result() -> None:
    pop = make_population(4, SHAPES)
    a, _, _ = run_shuffle(pop, 0.5, seed=9, event=2)
    b, _, _ = run_shuffle(pop, 0.5, seed=9, event=2)
    c, _, _ = run_shuffle(pop, 0.5, seed=10, event=2)

    def flat(pop: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for m in pop for t in m])

    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


def test_optimizer_state_moves_with_its_weight() -> None:
    n = 4
    weights = make_population(n, SHAPES)
    momentum = [[2 * t + 1 for t in m] for m in weights]  # a function of the weight
    numels = [math.prod(s) for s in SHAPES]
    mask = event_mask(numels, [0.5] * len(SHAPES), seed=1, event=1)
    before = clone(weights)
    count = shuffle_population(
        [{"weights": w, "momentum_buffer": b} for w, b in zip(weights, momentum, strict=True)],
        mask,
        seed=1,
        event=1,
    )
    assert count.kinds == 2 and count.moved > 0
    assert any(not torch.equal(a, b) for a, b in zip(before[0], weights[0], strict=True))
    for w, b in zip(weights, momentum, strict=True):
        for wt, bt in zip(w, b, strict=True):
            assert torch.equal(bt, 2 * wt + 1)


def test_distributed_steps_equal_the_in_process_shuffle() -> None:
    """gather on each member, shuffle_values on the 'server', scatter back: same result."""
    pop = make_population(3, SHAPES)
    numels = [math.prod(s) for s in SHAPES]
    mask = event_mask(numels, [0.4] * len(SHAPES), seed=8, event=4)
    in_process, _, _ = run_shuffle(pop, 0.4, seed=8, event=4)
    sent = [{"weights": gather(m, mask)} for m in pop]
    received, _ = shuffle_values(sent, seed=8, event=4)
    distributed = clone(pop)
    for member, values in zip(distributed, received, strict=True):
        scatter(member, mask, values["weights"])
    for a, b in zip(in_process, distributed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_gather_scatter_round_trip_and_shape_errors() -> None:
    tensors = [torch.arange(10.0), torch.arange(6.0).reshape(2, 3)]
    mask = event_mask([10, 6], [0.5, 0.5], seed=0, event=0)
    values = gather(tensors, mask)
    assert values.shape == (mask.num_selected,)
    target = [torch.zeros(10), torch.zeros(2, 3)]
    scatter(target, mask, values)
    assert torch.equal(gather(target, mask), values)
    with pytest.raises(ValueError, match="expected"):
        scatter(target, mask, values[:-1] if len(values) else torch.ones(1))
    with pytest.raises(ValueError, match="covers 2 tensors"):
        gather(tensors[:1], mask)


def test_shuffle_values_rejects_mismatched_or_non_finite_input() -> None:
    with pytest.raises(
        ValueError, match=r"member 1 sent 'weights' of shape \(3,\), expected \(4,\)"
    ):
        shuffle_values([{"weights": torch.ones(4)}, {"weights": torch.ones(3)}], seed=0, event=1)
    with pytest.raises(ValueError, match="kinds"):
        shuffle_values(
            [
                {"weights": torch.ones(4)},
                {"weights": torch.ones(4), "momentum_buffer": torch.ones(4)},
            ],
            seed=0,
            event=1,
        )
    with pytest.raises(ValueError, match="non-finite"):
        shuffle_values(
            [{"weights": torch.ones(4)}, {"weights": torch.tensor([1.0, math.nan, 0, 0])}],
            seed=0,
            event=1,
        )


@pytest.mark.parametrize("p", [1e-300, 5e-324, 1 - 1e-16])
def test_extreme_probabilities_terminate_with_the_right_selection(p: float) -> None:
    n = 1_000_000
    k = event_mask([n], [p], seed=0, event=0).num_selected
    assert k == (0 if p < 0.5 else n)
