"""The crossover's pieces: costs scaled by a power law in the parameter count, an operating
point's message rounds, and the fastest point that reaches a target."""

from __future__ import annotations

import dataclasses
import math

import pytest

from wash_fed.crossover import (
    FLOAT32_BYTES,
    OperatingPoint,
    PowerLaw,
    RoundLaw,
    StrategyCosts,
    point_seconds,
    run_rounds,
    time_to_target,
)
from wash_fed.time_model import Delivery, Link, Setting, run_seconds

NOTHING = PowerLaw(1.0, 0.0)


def constant(value: float) -> PowerLaw:
    return PowerLaw(1.0, value)


def costs(
    step: float = 0.1, server: float = 0.0, final: tuple[RoundLaw, ...] = ()
) -> StrategyCosts:
    idle = RoundLaw(NOTHING, NOTHING, NOTHING, NOTHING)
    return StrategyCosts(4, constant(step), NOTHING, constant(server), idle, final, NOTHING)


def point(
    name: str, rounds: int, accuracy: float, down: float = 1.0, up: float = 1.0
) -> OperatingPoint:
    return OperatingPoint(name, "s", rounds, 900 // rounds, accuracy, 0.0, 3, down, up)


def test_a_power_law_passes_through_both_measurements_and_extrapolates() -> None:
    law = PowerLaw.through((1e6, 2.0), (1e5, 0.5))
    assert law(1e5) == pytest.approx(0.5) and law(1e6) == pytest.approx(2.0)
    assert law(1e7) == pytest.approx(8.0), "the same factor for each tenfold"
    assert PowerLaw.through((1e5, 0.0), (1e6, 3.0))(1e7) == 3.0, "a zero makes it a constant"
    with pytest.raises(ValueError, match="two sizes"):
        PowerLaw.through((1e5, 1.0), (1e5, 2.0))


def test_a_points_rounds_scale_its_bytes_with_the_model_and_the_server_with_members() -> None:
    bn = RoundLaw(constant(5.0), NOTHING, constant(100.0), constant(10.0))
    the_point = OperatingPoint("p", "wash", 3, 20, 0.9, 0.0, 1, 0.1, 0.2, final=((0.5, 0.0),))
    rounds = run_rounds(the_point, costs(step=0.5, server=1.0, final=(bn,)), 1e6, members=8)
    assert len(rounds) == 1 + 3 + 1, "hello, three training rounds, the BatchNorm round"
    training = rounds[1]
    assert training.down == pytest.approx(0.1 * 1e6 * FLOAT32_BYTES)
    assert training.up == pytest.approx(0.2 * 1e6 * FLOAT32_BYTES)
    assert training.compute == pytest.approx(20 * 0.5)
    assert training.server == pytest.approx(2.0), "measured with 4 members, here 8"
    assert rounds[-1].down == pytest.approx(0.5 * 1e6 * FLOAT32_BYTES), "the point's own bytes"
    assert rounds[-1].compute == 5.0, "the costs' compute"


def test_the_fastest_point_that_reaches_the_target_is_chosen() -> None:
    few, many = point("few", 3, 0.91, down=1.0, up=1.0), point("many", 30, 0.91, 0.01, 0.01)
    below = point("below", 1, 0.80, 0.0, 0.0)
    slow_link = Setting(4, Delivery(0.0, poll=0.0), Link(1.0))
    fast_link = Setting(4, Delivery(2.0, poll=0.0), Link(1000.0))
    for setting, fastest in ((slow_link, "many"), (fast_link, "few")):
        found = time_to_target([few, many, below], costs(), 1e6, setting, target=0.9)
        assert found is not None and found[1].name == fastest
        rounds = run_rounds(found[1], costs(), 1e6, 4)
        assert found[0] == pytest.approx(run_seconds(rounds, setting))
    assert time_to_target([below], costs(), 1e6, slow_link, target=0.9) is None
    waiting = dataclasses.replace(costs(), outside=constant(7.0))
    below_seconds = run_seconds(run_rounds(below, waiting, 1e6, 4), slow_link) + 7.0
    assert point_seconds(below, waiting, 1e6, slow_link) == pytest.approx(below_seconds), (
        "a point below the target is timed all the same, with the time outside its rounds"
    )


def test_a_point_needs_rounds_steps_and_bytes_that_make_sense() -> None:
    with pytest.raises(ValueError, match="operating point"):
        OperatingPoint("bad", "s", 0, 30, 0.9, 0.0, 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="operating point"):
        point("bad", 3, 0.9, down=-1.0)
    assert math.isfinite(costs().step(1e9))
