"""The gate every member reply passes before anything from it reaches another member, the
soup or the BatchNorm merge. Framework-free: plain tensors and numbers in, a reason out.

Every place that admits values calls one pipeline, :meth:`ReplyGate.admit`: form, then
magnitude and direction against the others, then one log line for each member left out,
then (for training rounds) the quarantine count. What it checks, per reply:

* **form** -- tensor names (or value kinds), shapes and dtypes exactly as expected, every
  value finite, a whole model's BatchNorm running variances not negative
  (:func:`check_tensors`, :func:`check_values`, :func:`check_model`);
* **magnitude and direction** -- relative to the population: a member whose values sit far
  from the coordinate-wise median of the members' values, measured in units of the
  members' typical spread around it, or whose values do not point where the others' do
  (their projection on the median: negated or zeroed values), is an outlier
  (:func:`magnitude_outliers`; needs three or more members: with two there is no majority
  to tell who is off);
* **metrics** -- every reported figure is known and in its range (:func:`check_metrics`);
* **BatchNorm statistics** -- the layers and shapes of the model, finite, variances not
  negative (:func:`check_bn_statistics`); the merge weight a member claims is capped at what
  its data can support (:func:`capped_batches`).

What it cannot catch: a member that trains honestly on poisoned or mislabelled data sends
well-formed values of ordinary magnitude; so does one that drifts slowly, or scales its
values by less than :data:`ALIGNMENT_FLOOR` either way. The gate bounds the harm one reply
can do; it does not certify the data behind it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from wash_fed.batchnorm import BNStatistics, bn_layers_of
from wash_fed.chunks import chunk_length
from wash_fed.keys import Metric

__all__ = [
    "ALIGNMENT_FACTOR",
    "ALIGNMENT_FLOOR",
    "METRIC_RANGES",
    "Admission",
    "Payload",
    "Quarantine",
    "ReplyGate",
    "all_finite",
    "capped_batches",
    "check_bn_statistics",
    "check_metrics",
    "check_model",
    "check_tensors",
    "check_values",
    "magnitude_outliers",
    "require_finite",
]

METRIC_RANGES: dict[str, tuple[float, float]] = {
    Metric.PARTITION_ID: (0, math.inf),
    Metric.LOSS: (0, math.inf),
    Metric.TRAIN_ACCURACY: (0, 1),
    Metric.TEST_ACCURACY: (0, 1),
    Metric.ACCURACY: (0, 1),
    Metric.NUM_EXAMPLES: (0, math.inf),
    Metric.TEST_EXAMPLES: (0, math.inf),
    Metric.HOLDOUT_EXAMPLES: (0, math.inf),
    Metric.STEPS: (0, math.inf),
    Metric.STEPS_DONE: (0, math.inf),
    Metric.EPOCHS: (0, math.inf),
    Metric.APPLIED_EVENT: (0, math.inf),
    Metric.MASK_SIZE: (0, math.inf),
    Metric.BATCHES: (0, math.inf),
    Metric.RESTORE_SECONDS: (0, math.inf),
    Metric.TRAIN_SECONDS: (0, math.inf),
    Metric.HANDLER_SECONDS: (0, math.inf),
    Metric.CHECKPOINT_SECONDS: (0, math.inf),
    Metric.RESPOND_SECONDS: (0, math.inf),
    Metric.STARTUP_SECONDS: (0, math.inf),
    Metric.DELIVERED_AT: (0, math.inf),
    Metric.RECEIVED_AT: (0, math.inf),
    Metric.WORKER_PID: (0, math.inf),
}
"""Every metric the member protocol reads, with its closed range; all must be finite."""
MAX_METRICS = 64
"""The most metrics one reply may carry: a task's own figures beside the protocol's."""
MAX_METRIC_NAME = 64


def check_metrics(metrics: Mapping[str, object]) -> str | None:
    """Why a member's metrics are unacceptable (``None``: they are fine): each a finite
    number, within its range where the protocol reads it (:data:`METRIC_RANGES`); a task's
    own figures beside them (a user's ``train`` may report any) up to :data:`MAX_METRICS`,
    their names up to :data:`MAX_METRIC_NAME` characters."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, more than {MAX_METRICS}"
    for key, value in metrics.items():
        if len(key) > MAX_METRIC_NAME:
            return f"a metric's name is {len(key)} characters long, more than {MAX_METRIC_NAME}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {key!r} is {value!r}, not a number"
        low, high = METRIC_RANGES.get(key, (-math.inf, math.inf))
        if not (math.isfinite(value) and low <= value <= high):
            return f"metric {key!r} is {value}, outside [{low}, {high}]"
    return None


def all_finite(values: Tensor) -> bool:
    """Whether every value of ``values`` is finite (any dtype; integers always are). One
    read: a float32 sum is finite only if every term is (a NaN or an infinity propagates);
    only a sum that is not, from bad values or an overflow of huge ones, is checked value
    by value, about four times slower."""
    if not values.is_floating_point():
        return True
    return bool(values.sum(dtype=torch.float32).isfinite()) or bool(values.isfinite().all())


def check_tensors(payload: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> str | None:
    """Why ``payload`` is not a finite copy of ``reference``'s names, shapes and dtypes."""
    if payload.keys() != reference.keys():
        missing = sorted(reference.keys() - payload.keys())[:3]
        extra = sorted(payload.keys() - reference.keys())[:3]
        return f"tensors differ from the model's (missing {missing}, unexpected {extra})"
    for name, value in payload.items():
        expected = reference[name]
        if value.shape != expected.shape or value.dtype != expected.dtype:
            return (
                f"{name!r} is {value.dtype} {tuple(value.shape)}, expected "
                f"{expected.dtype} {tuple(expected.shape)}"
            )
        if not all_finite(value):
            return f"{name!r} holds non-finite values"
    return None


def check_values(
    payload: Mapping[str, Tensor], kinds: list[str], selected: int, dtype: torch.dtype
) -> str | None:
    """Why a WASH payload (one flat vector of ``selected`` values per kind) is unacceptable."""
    if sorted(payload) != sorted(kinds):
        return f"sent value kinds {sorted(payload)}, expected {sorted(kinds)}"
    reference = {kind: torch.empty(selected, dtype=dtype) for kind in kinds}
    for kind, value in payload.items():
        if tuple(value.shape) != (selected,):
            return f"{kind!r} has shape {tuple(value.shape)}, the mask selects {selected}"
    return check_tensors(payload, reference)


ALIGNMENT_FLOOR = 0.5
"""How far a member's projection on the median may stray from the members' typical one at
least (the median's own is 1: negated values give about -1, zeros 0, a copy scaled by c
about c)."""
ALIGNMENT_FACTOR = 10.0
"""... and in units of how far the members' projections typically stray."""
ALIGNMENT_MIN_SIZE = 256
"""Tensors with fewer values are not judged by direction (too few to say)."""


def magnitude_outliers(
    payloads: Mapping[int, Mapping[str, Tensor]],
    factor: float,
    *,
    statistics: Collection[str] = (),
) -> dict[int, str]:
    """Members whose values are far from the population's, with the reason.

    For every floating-point tensor, with ``med`` the coordinate-wise median over members,
    each member's distance is the root mean square of ``value - med``, and the typical
    distance ``s`` is the smallest distance within which a strict majority of the members
    lie (the median of the distances for an odd count, the upper median for an even one;
    at least 1e-3 of the root mean square of ``med``). A member is an outlier when its
    distance exceeds ``factor * s``. Judging members by whole-tensor distances, not
    coordinate by coordinate, keeps honest members that are nearly equal at most
    coordinates (a shared initialisation early in training) from looking far apart at the
    few where they differ. The majority's radius, not the lower median, keeps two honest
    members that happen to be close (similar label mixes among four) from making the
    other two look far.

    Direction: for tensors of at least :data:`ALIGNMENT_MIN_SIZE` values, each member's
    projection on the median, ``<value, med> / <med, med>``, is compared with the members'
    median projection; a member is an outlier when it strays more than
    ``max(ALIGNMENT_FLOOR, ALIGNMENT_FACTOR * r)``, ``r`` the majority's radius of those
    strays. Negated or zeroed values are close to the median in distance when members are
    spread, but point elsewhere. Tensors named in ``statistics`` (BatchNorm's running
    means and variances: statistics of each member's own data, whose scale honest members
    need not share) are judged by distance only.

    Needs three members or more, a strict majority of them honest (returns nothing for
    fewer); payloads must already have passed the form checks.
    """
    if len(payloads) < 3:
        return {}
    members = sorted(payloads)
    outliers: dict[int, str] = {}
    for name, first in payloads[members[0]].items():
        if not first.is_floating_point() or not first.numel():
            continue
        spread = _spread([payloads[m][name].reshape(-1) for m in members])
        distances = (spread.squares / first.numel()).sqrt()
        floor = 1e-3 * math.sqrt(spread.median_squares / first.numel()) + 1e-12
        typical = max(_majority_radius(distances), floor)
        for member, score in zip(members, (distances / typical).tolist(), strict=True):
            if score > factor and member not in outliers:
                outliers[member] = (
                    f"{name!r} is {score:.3g} times the members' typical distance from their "
                    f"median (limit {factor:g})"
                )
        directed = name not in statistics and first.numel() >= ALIGNMENT_MIN_SIZE
        if directed and spread.median_squares > 0.0:
            projections = spread.products / spread.median_squares
            for member, reason in _direction_outliers(name, projections, members).items():
                outliers.setdefault(member, reason)
    return outliers


GATE_CHUNK = 1 << 15
"""Coordinates the gate reads at a time from every member's values (the median needs them
side by side), at most: its memory is bounded whatever the tensors' size."""
GATE_CHUNK_VALUES = 1 << 19
"""Values (of all members together) a chunk of the gate holds: its memory is bounded
whatever the number of members."""
NETWORK_MEMBERS = 64
"""Up to this many members the CPU's median is a selection network (faster than numpy's
partition of each coordinate's values there); above it, numpy's partition."""


@dataclass(frozen=True)
class _Spread:
    """Each member's values against the coordinate-wise median ``med`` of all of them: the
    sums over coordinates of ``(value - med)**2`` and of ``value * med`` (one entry per
    member, float64), and the sum of ``med**2``."""

    squares: Tensor
    products: Tensor
    median_squares: float


def _spread(rows: list[Tensor]) -> _Spread:
    """:class:`_Spread` of ``rows`` (one flat tensor per member, all of one length, dtype
    and device), read once, a chunk of coordinates at a time in at least float32 (each
    chunk's sums in its dtype, their total in float64). One thread: the median's many short
    numpy calls would spend more on handing the interpreter's lock between threads than
    they save."""
    work = torch.promote_types(rows[0].dtype, torch.float32)
    squares = torch.zeros(len(rows), dtype=torch.float64, device=rows[0].device)
    products = torch.zeros_like(squares)
    median_squares = 0.0
    length = chunk_length(len(rows), coordinates=GATE_CHUNK, values=GATE_CHUNK_VALUES)
    for start in range(0, rows[0].numel(), length):
        sent = torch.stack([row[start : start + length] for row in rows])
        median = _lower_median(sent).to(work)
        chunk = sent.to(work)
        products += chunk @ median
        median_squares += float(median @ median)
        squares += chunk.sub_(median).square_().sum(dim=1)
    return _Spread(squares.cpu(), products.cpu(), median_squares)


def _lower_median(chunk: Tensor) -> Tensor:
    """The median of each column of ``chunk`` (shape ``(N, c)``: one row per member), the
    lower one for an even ``N`` as ``torch.median`` takes it, in ``chunk``'s dtype. On the
    CPU up to :data:`NETWORK_MEMBERS` members by :func:`_median_network` over the rows,
    above that by numpy's partition, 16-bit floats as their :func:`_ordered_int16` keys
    (half of float32's bytes, and twice the values an instruction compares); elsewhere by
    torch's median."""
    if chunk.device.type != "cpu":
        return chunk.median(dim=0).values
    sixteen = chunk.dtype in (torch.float16, torch.bfloat16)
    values = _ordered_int16(chunk.view(torch.int16).numpy()) if sixteen else chunk.numpy()
    members, lower = chunk.shape[0], (chunk.shape[0] - 1) // 2
    if members > NETWORK_MEMBERS:
        median = np.partition(values.T, lower, axis=1)[:, lower]
    else:
        rows = list(values if sixteen else values.copy())
        for low, high in _median_network(members):
            smaller = np.minimum(rows[low], rows[high])
            np.maximum(rows[low], rows[high], out=rows[high])
            rows[low] = smaller
        median = rows[lower]
    if sixteen:
        return torch.from_numpy(_ordered_int16(median)).view(chunk.dtype)
    return torch.from_numpy(median)


def _ordered_int16(bits: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """Keys of 16-bit floats (their bits as int16) that order as the floats do, a new array;
    applied to keys, the floats' bits again. A float16 or bfloat16 is sign and magnitude:
    its bits as int16 order the non-negative ones, and reversing the magnitude bits of the
    negative ones (XOR 0x7FFF) orders those below them (-0.0 just below +0.0, which the
    floats hold equal; NaNs at the ends, which the gate rejects before)."""
    return bits ^ ((bits >> 15) & np.int16(0x7FFF))


@cache
def _median_network(members: int) -> tuple[tuple[int, int], ...]:
    """The compare-exchanges that leave the lower median of ``members`` values in position
    ``(members - 1) // 2``: Batcher's odd-even merge sort of the next power of two, less
    those that touch a position ``>= members`` (think of it as holding +inf, which no
    compare-exchange moves down) and those the median does not depend on. Each pair
    ``(low, high)``, ``low < high``: the smaller value to ``low``, the larger to ``high``."""
    size = 1 << max(0, (members - 1).bit_length())
    network = []
    merged = 1
    while merged < size:
        step = merged
        while step >= 1:
            for first in range(step % merged, size - step, 2 * step):
                for offset in range(min(step, size - first - step)):
                    low, high = first + offset, first + offset + step
                    if low // (2 * merged) == high // (2 * merged):
                        network.append((low, high))
            step //= 2
        merged *= 2
    needed, kept = {(members - 1) // 2}, []
    for low, high in reversed(network):
        if high < members and (low in needed or high in needed):
            kept.append((low, high))
            needed |= {low, high}
    return tuple(reversed(kept))


def _majority_radius(values: Tensor) -> float:
    """The smallest bound within which a strict majority of ``values`` (one per member)
    lie."""
    return float(values.sort().values[len(values) // 2])


def _direction_outliers(name: str, projections: Tensor, members: list[int]) -> dict[int, str]:
    """Members whose values do not point where the others' do: their ``projections`` on
    the members' median (one per member) stray from the median projection by more than
    ``max(ALIGNMENT_FLOOR, ALIGNMENT_FACTOR * radius)``."""
    center = float(projections.median())
    strays = (projections - center).abs()
    limit = max(ALIGNMENT_FLOOR, ALIGNMENT_FACTOR * _majority_radius(strays))
    return {
        member: (
            f"{name!r} points elsewhere than the members' values: its projection on their "
            f"median is {float(p):.3g}, theirs about {center:.3g} (limit +-{limit:.3g})"
        )
        for member, p, stray in zip(members, projections, strays.tolist(), strict=True)
        if stray > limit
    }


def check_model(state_dict: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> str | None:
    """Why a whole model is not of ``reference``'s form (:func:`check_tensors`) or holds a
    negative BatchNorm running variance (those are judged by distance only, so their sign is
    checked here)."""
    problem = check_tensors(state_dict, reference)
    if problem:
        return problem
    negative = [
        f"{layer}.running_var"
        for layer in bn_layers_of(reference).variances
        if bool((state_dict[f"{layer}.running_var"] < 0).any())
    ]
    return f"negative BatchNorm running variances in {negative[:3]}" if negative else None


def check_bn_statistics(stats: BNStatistics, reference: BNStatistics) -> str | None:
    """Why BatchNorm statistics do not fit the model's layers or are not statistics."""
    for kind, values, expected in (
        ("means", stats.means, reference.means),
        ("variances", stats.variances, reference.variances),
    ):
        problem = check_tensors(values, expected)
        if problem:
            return f"BatchNorm {kind}: {problem}"
    if any(bool((v < 0).any()) for v in stats.variances.values()):
        return "BatchNorm variances are negative"
    if stats.batches < 1:
        return f"claims {stats.batches} batches"
    return None


def require_finite(state_dict: Mapping[str, Tensor], what: str) -> None:
    """Raise if any floating-point entry of ``state_dict`` is not finite: a run must not
    end with such a model and call itself completed."""
    bad = [k for k, v in state_dict.items() if not all_finite(v)]
    if bad:
        raise FloatingPointError(f"{what} is not finite ({len(bad)} tensors, e.g. {bad[0]!r})")


def capped_batches(claimed: int, examples: int, batch_size: int, bn_batches: int) -> int:
    """The merge weight a member gets for its BatchNorm statistics: what it claims, at most
    what its data (``examples`` images in batches of ``batch_size``) and ``bn-batches``
    allow."""
    return max(0, min(claimed, bn_batches, math.ceil(examples / batch_size)))


class Quarantine:
    """Members rejected ``limit`` times in a row are quarantined for the rest of the run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streaks: dict[int, int] = {}
        self.quarantined: set[int] = set()

    def rejected(self, member: int) -> bool:
        """Count a rejection; returns whether the member is now quarantined."""
        self.streaks[member] = self.streaks.get(member, 0) + 1
        if self.streaks[member] >= self.limit:
            self.quarantined.add(member)
        return member in self.quarantined

    def accepted(self, member: int) -> None:
        self.streaks.pop(member, None)


Payload = TypeVar("Payload")


@dataclass(frozen=True)
class Admission(Generic[Payload]):
    """What the gate let through of one exchange's replies and why it left the others out,
    by member (partition id, in order)."""

    accepted: dict[int, Payload]
    rejected: dict[int, str]
    quarantined: list[int] = field(default_factory=list)
    """Members this admission quarantined (only where it kept the count)."""


def _as_tensors(payload: object) -> Mapping[str, Tensor]:
    return cast(Mapping[str, Tensor], payload)


@dataclass(frozen=True)
class ReplyGate:
    """The one pipeline every member reply's values pass, wherever the server admits them
    (a round's exchange, the final collection, BatchNorm statistics, FedAvg's average, the
    population trainer's rounds): form, then magnitude and direction against the others,
    then a log line for each member left out, then the quarantine count.

    ``log`` receives each line (the ServerApp's log, the population trainer's console)."""

    outlier_factor: float
    log: Callable[[str], None]

    def admit(
        self,
        payloads: Mapping[int, Payload],
        form: Callable[[Payload], str | None],
        *,
        what: str,
        values: Callable[[Payload], Mapping[str, Tensor]] = _as_tensors,
        earlier: Mapping[int, str] | None = None,
        quarantine: Quarantine | None = None,
        errored: Iterable[int] = (),
        statistics: Collection[str] = (),
    ) -> Admission[Payload]:
        """The payloads of the members that pass, and why each other member is left out.

        1. ``form(payload)``: why a payload is not of the expected form (None: it is);
        2. :func:`magnitude_outliers` over ``values(payload)`` of those of the right form
           (the tensors named in ``statistics`` by distance only);
        3. one line for each member left out here or ``earlier`` (rejected before its values
           were read: a reply of the wrong records, metrics out of range), naming ``what``
           the values were for;
        4. with ``quarantine``: the members accepted start anew, those rejected or
           ``errored`` (failing with an error of their own) count one more, and those that
           reach the limit are quarantined (one line each).
        """
        rejected = dict(earlier or {})
        formed: dict[int, Payload] = {}
        for member, payload in sorted(payloads.items()):
            if member in rejected:
                continue
            problem = form(payload)
            if problem is None:
                formed[member] = payload
            else:
                rejected[member] = problem
        tensors = {member: values(payload) for member, payload in formed.items()}
        outliers = magnitude_outliers(tensors, self.outlier_factor, statistics=statistics)
        rejected |= outliers
        accepted = {m: p for m, p in formed.items() if m not in outliers}
        for member, reason in sorted(rejected.items()):
            self.log(f"member {member} rejected ({what}): {reason}")
        counted = [] if quarantine is None else self._count(quarantine, accepted, rejected, errored)
        return Admission(accepted, dict(sorted(rejected.items())), counted)

    def _count(
        self,
        quarantine: Quarantine,
        accepted: Iterable[int],
        rejected: Iterable[int],
        errored: Iterable[int],
    ) -> list[int]:
        """The quarantine count after one admission; the members it newly quarantines."""
        for member in accepted:
            quarantine.accepted(member)
        newly = []
        for member in sorted({*rejected, *errored}):
            already = member in quarantine.quarantined
            if quarantine.rejected(member) and not already:
                newly.append(member)
                self.log(
                    f"member {member} quarantined after {quarantine.limit} rejected or failed "
                    "replies in a row"
                )
        return newly
