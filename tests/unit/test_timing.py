"""Splitting a round's wall time into the members' compute, waiting for a slot, Flower's
delivery, transfer and the server's part."""

from __future__ import annotations

import math

import pytest

from wash_fed.keys import Metric
from wash_fed.timing import PARTS, RoundTime, split_round


def handled(handler: float, restore: float = 0.0, **seen: float) -> dict[str, float]:
    """A member's timing figures: its handling, and what its ClientApp saw (``seen``:
    respond, startup, delivered_at, received_at)."""
    figures = {Metric.TRAIN_SECONDS: handler / 2, Metric.HANDLER_SECONDS: handler}
    figures[Metric.RESTORE_SECONDS] = restore
    keys = {
        "respond": Metric.RESPOND_SECONDS,
        "startup": Metric.STARTUP_SECONDS,
        "delivered_at": Metric.DELIVERED_AT,
        "received_at": Metric.RECEIVED_AT,
    }
    return figures | {keys[name]: value for name, value in seen.items()}


def test_the_critical_member_is_the_last_reply() -> None:
    # Member 1 computes longer, but member 0's reply came last (a slower link): the round
    # waited on member 0, so its figures are the round's.
    time = split_round(
        10.0,
        in_flight={0: 9.0, 1: 7.0},
        reported={0: handled(3.0, restore=1.0, respond=4.5, startup=2.0), 1: handled(6.5)},
        simulated=False,
    )
    # Delivery: the process start (2) and the relay beyond the handling (0.5).
    assert time == RoundTime(compute=4.0, slot=0.0, delivery=2.5, transfer=2.5, server=1.0)
    assert math.fsum(time.as_dict().values()) == 10.0
    assert tuple(time.as_dict()) == PARTS


def test_in_simulation_the_wait_for_a_backend_slot_is_named_and_nothing_is_transfer() -> None:
    # Two slots, four members: member 3's message waited 4 s in Flower's queue.
    time = split_round(
        9.0,
        in_flight={0: 4.4, 3: 8.8},
        reported={
            0: handled(4.0, delivered_at=100.1, received_at=100.2),
            3: handled(4.0, delivered_at=100.1, received_at=104.3, respond=4.0),
        },
        simulated=True,
    )
    assert time.compute == 4.0 and time.transfer == 0.0
    assert time.slot == pytest.approx(4.2)
    assert time.delivery == pytest.approx(0.6)
    assert time.server == pytest.approx(0.2)


def test_without_flowers_stamp_a_simulated_round_has_no_slot() -> None:
    time = split_round(5.0, {0: 4.0}, {0: handled(3.0, received_at=50.0)}, simulated=True)
    assert time == RoundTime(3.0, 0.0, 1.0, 0.0, 1.0)


def test_members_without_timings_leave_the_round_to_the_server() -> None:
    # Member 2 never replied; member 1 replied without handling figures.
    time = split_round(4.0, in_flight={1: 3.0}, reported={1: {Metric.LOSS: 0.3}}, simulated=False)
    assert time == RoundTime(0.0, 0.0, 0.0, 0.0, 4.0)


@pytest.mark.parametrize("simulated", [False, True])
@pytest.mark.parametrize(
    ("in_flight", "figures"),
    [
        (12.0, handled(2.0)),  # in flight longer than the round (clock granularity)
        (3.0, handled(4.0, startup=9.0)),  # handling longer than the flight
        (3.0, handled(1.0, startup=9.0, respond=0.5)),  # delivery longer than the way
        (3.0, handled(-2.0, startup=-1.0, respond=-3.0)),  # negative figures from a member
        (3.0, handled(1.0, delivered_at=10.0, received_at=5.0)),  # clocks that disagree
        (3.0, handled(1.0, delivered_at=1.0, received_at=50.0)),  # a slot longer than the way
    ],
)
def test_parts_are_never_negative_and_sum_to_the_round(
    in_flight: float, figures: dict[str, float], simulated: bool
) -> None:
    time = split_round(10.0, {0: in_flight}, {0: figures}, simulated=simulated)
    assert all(value >= 0.0 for value in time.as_dict().values())
    assert sum(time.as_dict().values()) == pytest.approx(10.0, abs=1e-12)
