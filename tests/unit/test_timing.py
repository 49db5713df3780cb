"""Splitting a round's wall time into training, the member's other work, transfer and the
server's part."""

from __future__ import annotations

import math

import pytest

from wash_fed.keys import Metric
from wash_fed.timing import PARTS, RoundTime, split_round


def handled(train: float, handler: float, restore: float = 0.0) -> dict[str, float]:
    return {
        Metric.TRAIN_SECONDS: train,
        Metric.HANDLER_SECONDS: handler,
        Metric.RESTORE_SECONDS: restore,
    }


def test_the_critical_member_is_the_last_reply() -> None:
    # Member 1 trains longer, but member 0's reply came last (a slower link): the round
    # waited on member 0, so its figures are the round's.
    time = split_round(
        10.0,
        in_flight={0: 9.0, 1: 7.0},
        reported={0: handled(2.0, 3.0, restore=1.0), 1: handled(6.0, 6.5)},
    )
    assert time == RoundTime(train=2.0, member=2.0, transfer=5.0, server=1.0)
    assert math.fsum(time.as_dict().values()) == 10.0
    assert tuple(time.as_dict()) == PARTS


def test_members_without_timings_leave_the_round_to_the_server() -> None:
    # Member 2 never replied; member 1 replied without handling figures.
    time = split_round(4.0, in_flight={1: 3.0}, reported={1: {Metric.LOSS: 0.3}})
    assert time == RoundTime(0.0, 0.0, 0.0, 4.0)


@pytest.mark.parametrize(
    ("in_flight", "figures"),
    [
        (12.0, handled(1.0, 2.0)),  # in flight longer than the round (clock granularity)
        (3.0, handled(5.0, 4.0)),  # training longer than handling, handling than flight
        (3.0, handled(-1.0, -2.0)),  # negative figures from a member
    ],
)
def test_parts_are_never_negative_and_sum_to_the_round(
    in_flight: float, figures: dict[str, float]
) -> None:
    time = split_round(10.0, {0: in_flight}, {0: figures})
    assert all(value >= 0.0 for value in time.as_dict().values())
    assert sum(time.as_dict().values()) == pytest.approx(10.0, abs=1e-12)
