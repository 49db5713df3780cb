"""The time model: a message round's predicted parts, Flower's delivery calibrated on its
floor app, links and simulation slots."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from wash_fed.time_model import (
    FLOWER_POLL,
    Delivery,
    Link,
    MessageRound,
    Setting,
    round_time,
    run_seconds,
)


def test_a_deployment_round_adds_compute_delivery_transfer_and_the_server() -> None:
    setting = Setting(members=4, delivery=Delivery(fixed=1.0), link=Link(mbit=8.0, latency=0.05))
    time = round_time(MessageRound(down=1e6, up=2e6, compute=2.5, server=0.2), setting)
    assert time.compute == 2.5 and time.slot == 0.0 and time.server == 0.2
    assert time.delivery == pytest.approx(1.0 + FLOWER_POLL * 4 / 5)
    assert time.transfer == pytest.approx(3e6 * 8 / 8e6 + 0.1)


def test_delivery_grows_with_the_bytes_it_handles() -> None:
    delivery = Delivery(fixed=1.0, poll=0.0, per_byte=1e-6)
    setting = Setting(members=1, delivery=delivery, link=Link(math.inf))
    assert round_time(MessageRound(down=2e6, up=1e6, compute=0.0), setting).delivery == 4.0


def test_the_floor_apps_round_calibrates_the_delivery_it_predicts() -> None:
    delivery = Delivery.calibrated(floor_round=4.5, members=3)
    assert delivery.seconds(3) == pytest.approx(4.5)
    assert delivery.seconds(64) > delivery.seconds(3), "more members, a longer wait for polls"
    assert Delivery.calibrated(floor_round=0.5, members=3).fixed == 0.0


def test_simulated_members_wait_for_slots_in_waves_and_move_no_bytes() -> None:
    setting = Setting(members=5, delivery=Delivery(fixed=0.1, poll=0.0), slots=2)
    time = round_time(MessageRound(down=1e9, up=1e9, compute=3.0), setting)
    assert time.slot == 2 * 3.0, "five members in three waves of two"
    assert time.transfer == 0.0
    assert time.delivery == 0.1


def test_a_run_is_its_rounds_one_after_the_other() -> None:
    setting = Setting(members=2, delivery=Delivery(fixed=0.5, poll=0.0), link=Link(math.inf))
    rounds = [MessageRound(0, 0, 1.0), MessageRound(100, 100, 2.0, server=0.25)]
    assert run_seconds(rounds, setting) == pytest.approx(1.5 + 2.75)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Link(mbit=0.0),
        lambda: Link(mbit=10.0, latency=-1.0),
        lambda: Link(mbit=math.nan),
        lambda: Setting(members=0, delivery=Delivery(1.0)),
        lambda: Setting(members=2, delivery=Delivery(1.0), slots=0),
    ],
)
def test_settings_out_of_range_are_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="needs"):
        build()
