"""Which strategy hands over a model that reaches a target accuracy first, for a model of
any size, on any link, with any number of members: measured ways to train (operating
points) timed by :mod:`wash_fed.time_model`.

An :class:`OperatingPoint` is one way to train that a sweep measured (``simulations.frontier``):
a strategy, its rounds and local steps a round, the mean accuracy of the model it hands over
(FedAvg: its global model; WASH: its soup after the final step) and its bytes per member,
as multiples of the model's size in float32 (so that they scale with a model's parameter
count). What a message round costs besides its bytes -- a member's compute, the server's
work, the final step's rounds -- comes from runs of two models of different sizes and is
scaled between and beyond them by a power law in the parameter count (:class:`PowerLaw`).

A strategy's time to the target is that of its fastest point whose accuracy reaches it
(:func:`time_to_target`); what the points' accuracies are is the sweep's model and data, and
the map assumes they hold for other model sizes and member counts. Nothing here imports
Flower or torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from wash_fed.time_model import MessageRound, Setting, run_seconds

__all__ = [
    "FLOAT32_BYTES",
    "OperatingPoint",
    "PowerLaw",
    "RoundLaw",
    "StrategyCosts",
    "point_seconds",
    "run_rounds",
    "time_to_target",
]

FLOAT32_BYTES = 4
"""A parameter's size in float32: the unit of an operating point's bytes (with its count)."""


@dataclass(frozen=True)
class PowerLaw:
    """``value(params) = at_reference * (params / reference) ** exponent``: a cost measured
    on models of two sizes, between and beyond them (``at_reference`` >= 0)."""

    reference: float
    at_reference: float
    exponent: float = 0.0

    @classmethod
    def through(cls, first: tuple[float, float], second: tuple[float, float]) -> PowerLaw:
        """The law through ``(params, value)`` measured twice; a value of 0 on either side
        makes the law the other's constant (no power law passes through 0)."""
        (p1, v1), (p2, v2) = sorted((first, second))
        if p1 <= 0 or p1 == p2 or v1 < 0 or v2 < 0:
            raise ValueError(
                f"a power law needs two sizes > 0 and values >= 0, not {first}, {second}"
            )
        if v1 == 0 or v2 == 0:
            return cls(p1, max(v1, v2))
        return cls(p1, v1, math.log(v2 / v1) / math.log(p2 / p1))

    def __call__(self, params: float) -> float:
        return float(self.at_reference * (params / self.reference) ** self.exponent)


@dataclass(frozen=True)
class RoundLaw:
    """A message round outside training (the hello, one of the final step's), per member:
    its compute, the server's seconds, and its bytes down and up, each a law in the
    parameter count."""

    compute: PowerLaw
    server: PowerLaw
    down: PowerLaw
    up: PowerLaw

    def at(self, params: float) -> MessageRound:
        return MessageRound(
            self.down(params), self.up(params), self.compute(params), self.server(params)
        )


@dataclass(frozen=True)
class StrategyCosts:
    """What a strategy's run costs besides its training rounds' bytes, measured with
    ``members`` members: a local step's compute and a training round's own (evaluation,
    checkpoint); the server's seconds a training round; the hello's and final step's
    message rounds; the server's time outside message rounds. The server's seconds in
    message rounds grow in proportion to the members (it reads, judges and answers each)."""

    members: int
    step: PowerLaw
    round_compute: PowerLaw
    server: PowerLaw
    setup: RoundLaw
    final: tuple[RoundLaw, ...]
    outside: PowerLaw


@dataclass(frozen=True)
class OperatingPoint:
    """One measured way to train: ``rounds`` rounds of ``local_steps`` steps, the handed-over
    model's mean accuracy (``spread``: its standard deviation over ``seeds`` seeds), and per
    member in model sizes (float32): ``down`` and ``up`` a training round (spread evenly
    over the rounds, which a linear time model cannot tell apart) and ``final`` the bytes
    (down, up) of each of the final step's message rounds the point sets itself (WASH's
    BatchNorm round: the soup in its final dtype); the rest come from its costs."""

    name: str
    strategy: str
    rounds: int
    local_steps: int
    accuracy: float
    spread: float
    seeds: int
    down: float
    up: float
    final: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_steps < 1 or self.down < 0 or self.up < 0:
            raise ValueError(f"an operating point needs rounds, steps >= 1, bytes >= 0: {self}")


def run_rounds(
    point: OperatingPoint, costs: StrategyCosts, params: float, members: int
) -> list[MessageRound]:
    """``point``'s message rounds for a model of ``params`` parameters with ``members``
    members: the hello, its training rounds, its final step's (bytes from the point where
    it has them, else from the costs)."""
    size, share = params * FLOAT32_BYTES, members / costs.members
    training = MessageRound(
        down=point.down * size,
        up=point.up * size,
        compute=costs.round_compute(params) + point.local_steps * costs.step(params),
        server=costs.server(params) * share,
    )
    final = [law.at(params) for law in costs.final]
    for index, (down, up) in enumerate(point.final[: len(final)]):
        final[index] = dataclasses.replace(final[index], down=down * size, up=up * size)
    others = [
        dataclasses.replace(r, server=r.server * share) for r in [costs.setup.at(params), *final]
    ]
    return [others[0], *[training] * point.rounds, *others[1:]]


def point_seconds(
    point: OperatingPoint, costs: StrategyCosts, params: float, setting: Setting
) -> float:
    """``point``'s run in ``setting`` for a model of ``params`` parameters, in seconds: its
    message rounds and the time outside them."""
    rounds = run_rounds(point, costs, params, setting.members)
    return run_seconds(rounds, setting) + costs.outside(params)


def time_to_target(
    points: Sequence[OperatingPoint],
    costs: StrategyCosts,
    params: float,
    setting: Setting,
    target: float,
) -> tuple[float, OperatingPoint] | None:
    """The fastest of ``points`` whose accuracy reaches ``target`` and its run's seconds
    in ``setting`` for a model of ``params`` parameters (None: no point reaches it)."""
    timed = [(point_seconds(p, costs, params, setting), p) for p in points if p.accuracy >= target]
    return min(timed, key=lambda pair: pair[0], default=None)
