"""WASH: partial weight shuffling across a population of models.

Fournier et al., 2024, "WASH: Train your Ensemble with Communication-Efficient Weight
Shuffling, then Average" (arXiv 2405.17517).

A *population* of ``N`` *members* shares one architecture. At *shuffle event* ``r`` every
scalar of parameter tensor ``l`` is selected with probability ``p_l`` (the *mask*), and for
every selected coordinate an independent, uniformly random permutation of the ``N`` members
is drawn and applied to the members' values at that coordinate.

The work is split into the steps a distributed run needs, so that one process can do all of
them (:func:`shuffle_population`) or they can be spread over machines:

* :func:`event_mask` -- which coordinates take part. Derived from ``(seed, event, l)`` with a
  counter-based generator (Philox), so every process on every device derives the same mask
  and masks never have to travel.
* :func:`gather` -- a member's values at the mask, as one flat vector of length ``m``.
* :func:`shuffle_values` -- ``N`` gathered vectors in, the ``N`` vectors each member receives
  out: what :func:`permute` does with :func:`draw_permutations`, one permutation per
  coordinate, a chunk of coordinates at a time.
* :func:`scatter` -- write the received values back at the mask.

Invariants (tested): each coordinate's multiset of values over the population is unchanged,
so the population mean is preserved exactly; unselected coordinates never change; the
expected selected fraction of tensor ``l`` is ``p_l`` and the expected moved fraction is
``p_l * (1 - 1/N)``.

Values of several *kinds* (the weights, and optionally optimizer state such as SGD's
``momentum_buffer``) can be shuffled together: they share the mask and the permutation, so
the state of a coordinate moves with its weight (WASH+Opt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from wash_fed.chunks import chunk_length, over_chunks
from wash_fed.gate import all_finite

__all__ = [
    "DrawnPermutations",
    "LayerSchedule",
    "ShuffleCount",
    "ShuffleMask",
    "ShuffledValues",
    "draw_ahead",
    "draw_permutations",
    "event_mask",
    "gather",
    "layer_probs",
    "permute",
    "scatter",
    "shuffle_population",
    "shuffle_values",
    "wash_mask",
]

LayerSchedule = Literal["linear", "constant"]
LAYER_SCHEDULES: tuple[str, ...] = get_args(LayerSchedule)

# Independent random streams derived from the same (seed, event).
_MASK_STREAM = 0
_PERMUTATION_STREAM = 1


def layer_probs(shuffle_prob: float, num_tensors: int, schedule: LayerSchedule) -> list[float]:
    """Per-tensor shuffle probabilities ``p_l`` for ``l = 0 .. num_tensors - 1``.

    ``constant``: ``p_l = p``. ``linear``: ``p_l = p * (1 - l / (L - 1))``, so the first tensor
    (in registration order) is shuffled with probability ``p`` and the last one never;
    with a single tensor, ``p_0 = p``.
    """
    if not 0.0 <= shuffle_prob <= 1.0:
        raise ValueError(f"shuffle_prob must be in [0, 1], got {shuffle_prob}")
    if num_tensors < 0:
        raise ValueError(f"num_tensors must be >= 0, got {num_tensors}")
    if schedule == "constant" or num_tensors <= 1:
        return [shuffle_prob] * num_tensors
    if schedule == "linear":
        return [shuffle_prob * (1.0 - l / (num_tensors - 1)) for l in range(num_tensors)]
    raise ValueError(f"layer schedule must be one of {LAYER_SCHEDULES}, got {schedule!r}")


def _key(seed: int, event: int, stream: int, index: int) -> np.random.SeedSequence:
    """The seed of the numbers keyed by ``(seed, event, stream, index)``."""
    if min(seed, event, index) < 0:
        raise ValueError(f"seed, event and index must be >= 0, got {seed}, {event}, {index}")
    return np.random.SeedSequence((seed, event, stream, index))


def _generator(seed: int, event: int, stream: int, index: int) -> np.random.Generator:
    """A Philox generator keyed by ``(seed, event, stream, index)``; same key, same numbers."""
    return np.random.Generator(np.random.Philox(_key(seed, event, stream, index)))


@dataclass(frozen=True)
class ShuffleMask:
    """The coordinates one shuffle event selects.

    ``indices[l]`` holds the sorted flat indices (int64, CPU) selected in tensor ``l``.
    A member's gathered vector is the concatenation, in tensor order, of its values there,
    so its length is :attr:`num_selected`.
    """

    indices: tuple[Tensor, ...]

    def to(self, device: torch.device | str) -> ShuffleMask:
        """The same mask with its indices on ``device`` (move once, gather and scatter many)."""
        return ShuffleMask(tuple(i.to(device) for i in self.indices))

    @property
    def sizes(self) -> list[int]:
        """Number of selected coordinates per tensor."""
        return [int(i.numel()) for i in self.indices]

    @property
    def num_selected(self) -> int:
        """Total number of selected coordinates ``m`` (per member)."""
        return sum(self.sizes)

    def digest(self) -> str:
        """A short fingerprint, for checking that two processes derived the same mask."""
        h = hashlib.blake2b(digest_size=8)
        for idx in self.indices:
            h.update(idx.numel().to_bytes(8, "little"))
            h.update(idx.cpu().numpy().tobytes())
        return h.hexdigest()


def _bernoulli_indices(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Sorted indices of ``n`` independent Bernoulli(``p``) trials that succeeded.

    Drawn as geometric gaps between successes: the work scales with the number of successes,
    not with ``n``, and the result comes out sorted.
    """
    if p <= 0.0 or n == 0:
        return np.empty(0, dtype=np.int64)
    if p >= 1.0:
        return np.arange(n, dtype=np.int64)
    expected = n * p
    chunk = int(expected + 8.0 * np.sqrt(expected) + 16)

    def gaps() -> np.ndarray:
        # A gap past n ends the selection anyway; capping it keeps cumulative sums exact.
        return np.minimum(rng.geometric(p, size=chunk), n + 1)

    positions = np.cumsum(gaps()) - 1
    while positions[-1] < n:  # rarely taken: the first chunk almost always reaches past n
        positions = np.concatenate([positions, np.cumsum(gaps()) + positions[-1]])
    return positions[: np.searchsorted(positions, n)].astype(np.int64)


def event_mask(
    numels: Sequence[int], probs: Sequence[float], *, seed: int, event: int
) -> ShuffleMask:
    """Derive the mask of shuffle event ``event`` for tensors with ``numels[l]`` scalars.

    Each scalar of tensor ``l`` is selected independently with probability ``probs[l]``.
    Deterministic in ``(seed, event, l)``: identical in every process and on every device.
    """
    if len(numels) != len(probs):
        raise ValueError(f"got {len(numels)} tensor sizes but {len(probs)} probabilities")
    indices = []
    for l, (n, p) in enumerate(zip(numels, probs, strict=True)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability of tensor {l} must be in [0, 1], got {p}")
        rng = _generator(seed, event, _MASK_STREAM, l)
        indices.append(torch.from_numpy(_bernoulli_indices(rng, n, p)))
    return ShuffleMask(tuple(indices))


def wash_mask(
    numels: Sequence[int], event: int, *, shuffle_prob: float, schedule: str, seed: int
) -> ShuffleMask:
    """The mask of WASH's shuffle event ``event`` over parameter tensors of ``numels``
    scalars (in registration order): :func:`layer_probs` of ``shuffle_prob`` under the
    layer ``schedule``, drawn by :func:`event_mask` from ``(seed, event)``. Every process
    that knows the run's configuration derives the same mask, so masks never travel."""
    if schedule not in LAYER_SCHEDULES:
        raise ValueError(f"layer schedule must be one of {LAYER_SCHEDULES}, got {schedule!r}")
    probs = layer_probs(shuffle_prob, len(numels), schedule)  # type: ignore[arg-type]
    return event_mask(numels, probs, seed=seed, event=event)


def _check_aligned(tensors: Sequence[Tensor], mask: ShuffleMask) -> None:
    if len(tensors) != len(mask.indices):
        raise ValueError(f"mask covers {len(mask.indices)} tensors, got {len(tensors)}")


def gather(tensors: Sequence[Tensor], mask: ShuffleMask) -> Tensor:
    """Values of ``tensors`` at ``mask``: shape ``(m,)``, on the tensors' device.

    All tensors must share one dtype and device; ``tensors[l]`` is read at ``mask.indices[l]``.
    """
    _check_aligned(tensors, mask)
    if not tensors:
        return torch.empty(0)
    parts = [
        t.detach().reshape(-1)[idx.to(t.device)]
        for t, idx in zip(tensors, mask.indices, strict=True)
    ]
    return torch.cat(parts)


def scatter(tensors: Sequence[Tensor], mask: ShuffleMask, values: Tensor) -> None:
    """Write ``values`` (shape ``(m,)``, as :func:`gather` makes them) at ``mask``, in place."""
    _check_aligned(tensors, mask)
    if values.shape != (mask.num_selected,):
        raise ValueError(
            f"expected {mask.num_selected} values for this mask, got shape {tuple(values.shape)}"
        )
    offset = 0
    with torch.no_grad():
        for t, idx in zip(tensors, mask.indices, strict=True):
            k = idx.numel()
            if k:
                flat = t.view(-1)
                flat[idx.to(t.device)] = values[offset : offset + k].to(t.device, t.dtype)
            offset += k


PERMUTATION_CHUNK = 1 << 14
"""Coordinates whose permutations are drawn and applied at a time, at most
(:data:`PERMUTATION_CHUNK_VALUES` bounds them for many members): memory bounded whatever
the mask's size and the number of members, and a chunk of every member's values within
the cache. The permutations do not depend on it."""
PERMUTATION_CHUNK_VALUES = 1 << 18
"""Values (of all members together) a chunk of the permutations or the exchange holds."""


def _permutation_chunk(num_members: int) -> int:
    return chunk_length(num_members, coordinates=PERMUTATION_CHUNK, values=PERMUTATION_CHUNK_VALUES)


def _permutations_at(num_members: int, coordinates: slice, seed: int, event: int) -> Tensor:
    """The permutations of :func:`draw_permutations` for ``coordinates`` alone: int64 of
    shape ``(num_members, c)``, column ``j`` the permutation of coordinate
    ``coordinates.start + j``. The stream is jumped to the chunk's first key
    (``PCG64DXSM.advance``), so chunks can be drawn in any order, side by side."""
    bits = np.random.PCG64DXSM(_key(seed, event, _PERMUTATION_STREAM, num_members))
    bits.advance(coordinates.start * num_members)
    count = coordinates.stop - coordinates.start
    return torch.from_numpy(_ordered_members(bits, count, num_members)).T


def _ordered_members(
    bits: np.random.PCG64DXSM, count: int, num_members: int
) -> npt.NDArray[np.int64]:
    """The next ``count`` coordinates' permutations from ``bits``, shape
    ``(count, num_members)``: the members ordered by their 64-bit keys. Each key's low
    ``b`` bits (``2**b >= num_members``) are replaced by its member's index before one sort
    of the keys themselves, several times faster than an argsort of rows this short; the
    order is the argsort's unless two keys of a coordinate agree above those bits
    (probability below ``num_members**2 / 2**(65 - b)``), which ties them by index."""
    index_bits = max(1, (num_members - 1).bit_length())
    keys = bits.random_raw(count * num_members).reshape(count, num_members)
    keys &= np.uint64(~((1 << index_bits) - 1) & 0xFFFF_FFFF_FFFF_FFFF)
    keys |= np.arange(num_members, dtype=np.uint64)
    keys.sort(axis=1)
    keys &= np.uint64((1 << index_bits) - 1)
    return keys.view(np.int64)


def draw_permutations(
    num_members: int,
    num_values: int,
    *,
    seed: int,
    event: int,
    dtype: torch.dtype = torch.int64,
) -> Tensor:
    """Independent uniform permutations of ``range(num_members)``, one per coordinate.

    Returns a CPU tensor of ``dtype`` (an integer type that holds ``num_members - 1``:
    ``torch.uint8`` keeps up to 256 members' permutations in an eighth of int64's memory)
    and shape ``(num_members, num_values)`` whose every column is a permutation.
    Deterministic in ``(seed, event, num_members, num_values)``: coordinate ``j``'s
    permutation is the argsort of ``num_members`` 64-bit keys, the ``j``-th group of that
    many in the ``(seed, event)`` stream, so it is the same however many coordinates are
    drawn (unless two keys of a coordinate agree in all but their lowest ``b`` bits, ``b``
    the bit length of ``num_members - 1``: probability below
    ``num_members**2 / 2**(65 - b)``; they are then ordered by index).
    """
    if num_members < 1 or num_values < 0:
        raise ValueError(
            f"need num_members >= 1 and num_values >= 0, got {num_members}, {num_values}"
        )
    if dtype.is_floating_point or torch.iinfo(dtype).max < num_members - 1:
        raise ValueError(f"{dtype} cannot hold the indices of {num_members} members")
    drawn = torch.empty(num_members, num_values, dtype=dtype)

    def draw(coordinates: slice) -> None:
        drawn[:, coordinates] = _permutations_at(num_members, coordinates, seed, event)

    over_chunks(draw, num_values, _permutation_chunk(num_members))
    return drawn


@dataclass(frozen=True)
class DrawnPermutations:
    """One shuffle event's permutations, drawn ahead of the values (:func:`draw_ahead`)."""

    seed: int
    event: int
    indices: Tensor
    """:func:`draw_permutations` of shape ``(N, m)``, in the narrowest dtype that holds
    them: ``torch.uint8`` up to 256 members (one byte a member and value), else int32."""
    moved: int
    """Coordinates whose value comes from another member, summed over members."""


def draw_ahead(num_members: int, num_values: int, *, seed: int, event: int) -> DrawnPermutations:
    """The permutations :func:`shuffle_values` applies to ``num_members`` members'
    ``num_values`` values at ``(seed, event)``, and what they move: to draw while the values
    are still on their way."""
    dtype = torch.uint8 if num_members <= 256 else torch.int32
    indices = draw_permutations(num_members, num_values, seed=seed, event=event, dtype=dtype)
    members = torch.arange(num_members, dtype=dtype)[:, None]
    return DrawnPermutations(seed, event, indices, int((indices != members).sum()))


def permute(values: Tensor, permutations: Tensor) -> Tensor:
    """Apply per-coordinate permutations: ``out[i, j] = values[permutations[i, j], j]``.

    ``values`` has shape ``(N, m, *rest)``; ``permutations`` has shape ``(N, m)`` with every
    column a permutation of ``range(N)``. Each column's multiset of values is unchanged.
    """
    if values.shape[:2] != permutations.shape:
        raise ValueError(
            f"values of shape {tuple(values.shape)} do not match permutations of shape "
            f"{tuple(permutations.shape)}"
        )
    trailing = [1] * (values.dim() - 2)
    index = permutations.to(values.device, torch.int64).view(*permutations.shape, *trailing)
    return torch.gather(values, 0, index.expand_as(values))


class ShuffledValues(NamedTuple):
    """What :func:`shuffle_values` returns."""

    received: list[dict[str, Tensor]]
    """``received[i][kind]``: the values member ``i`` writes back at the mask."""
    moved: int
    """Coordinates whose value now comes from another member, summed over members."""


def shuffle_values(
    values: Sequence[Mapping[str, Tensor]],
    *,
    seed: int,
    event: int,
    in_place: bool = False,
    drawn: DrawnPermutations | None = None,
    gated: bool = False,
) -> ShuffledValues:
    """The exchange of one shuffle event, given every participating member's gathered values.

    ``values[i][kind]`` is member ``i``'s vector of shape ``(m,)`` for that kind
    (``"weights"``, ``"momentum_buffer"``, ...). Every member must send the same kinds with
    the same ``m``. All kinds share one permutation per coordinate
    (:func:`draw_permutations`), so optimizer state moves with its weight; ``drawn`` are
    those of :func:`draw_ahead` for this ``seed``, ``event`` and shape (such as drawn while
    the members train), else they are drawn here first (``N`` bytes a value up to 256
    members, ``4 N`` above). Works through the coordinates a chunk at a time (side by side
    on the CPU's threads): beside the values it returns it holds one chunk of every
    member's per thread. Those values are new tensors, or with ``in_place`` the given ones
    overwritten. A non-finite value raises a ValueError naming its member, which
    ``in_place`` leaves with the other chunks exchanged, unless ``gated``: the reply gate
    has checked every value (:func:`wash_fed.gate.check_values`), so none is checked
    again.
    """
    if not values:
        return ShuffledValues([], 0)
    num_values = _check_shapes(values)
    n = len(values)
    if drawn is not None and (
        (drawn.seed, drawn.event) != (seed, event) or drawn.indices.shape != (n, num_values)
    ):
        raise ValueError(
            f"permutations drawn for seed {drawn.seed}, event {drawn.event} and shape "
            f"{tuple(drawn.indices.shape)}, not {seed}, {event} and {n} members' {num_values}"
        )
    if drawn is None:
        drawn = draw_ahead(n, num_values, seed=seed, event=event)
    indices = drawn.indices
    received = [
        dict(member) if in_place else {kind: t.new_empty(num_values) for kind, t in member.items()}
        for member in values
    ]

    def exchange(coordinates: slice) -> None:
        perms = indices[:, coordinates].to(torch.int32)  # an index type gather takes
        for kind in received[0]:
            chunk = torch.stack([member[kind][coordinates] for member in values])
            if not gated and not all_finite(chunk):
                bad = int((~chunk.isfinite()).any(dim=1).nonzero()[0])
                raise ValueError(f"member {bad} sent non-finite values for {kind!r}")
            exchanged = torch.gather(chunk, 0, perms.to(chunk.device))
            for row, mine in zip(received, exchanged, strict=True):
                row[kind][coordinates] = mine

    over_chunks(exchange, num_values, _permutation_chunk(n))
    return ShuffledValues(received, drawn.moved)


def _check_shapes(values: Sequence[Mapping[str, Tensor]]) -> int:
    """The length ``m`` every member's every kind shares; ValueError naming a member that
    sent other kinds or another shape."""
    kinds = sorted(values[0])
    num_values = values[0][kinds[0]].numel() if kinds else 0
    for i, member in enumerate(values):
        if sorted(member) != kinds:
            raise ValueError(f"member {i} sent kinds {sorted(member)}, member 0 sent {kinds}")
        for kind in kinds:
            if tuple(member[kind].shape) != (num_values,):
                raise ValueError(
                    f"member {i} sent {kind!r} of shape {tuple(member[kind].shape)}, "
                    f"expected ({num_values},)"
                )
    return num_values


@dataclass(frozen=True)
class ShuffleCount:
    """How much one shuffle event touched."""

    selected: int
    """Coordinates selected per member (the length ``m`` of each gathered vector)."""
    moved: int
    """Coordinates whose value came from another member, summed over members."""
    members: int
    kinds: int
    """Number of value kinds shuffled (weights, plus optimizer-state tensors)."""


def shuffle_population(
    members: Sequence[Mapping[str, Sequence[Tensor]]],
    mask: ShuffleMask,
    *,
    seed: int,
    event: int,
) -> ShuffleCount:
    """Run one shuffle event in place over a population held in one process.

    ``members[i][kind]`` is member ``i``'s list of tensors of that kind, aligned with the mask
    (e.g. ``{"weights": list(model.parameters())}``). The result equals, bit for bit, what the
    distributed protocol produces: gather, :func:`shuffle_values`, scatter.
    """
    if members:
        first = next(iter(members[0].values()))
        if first:
            mask = mask.to(first[0].device)
    gathered = [{kind: gather(ts, mask) for kind, ts in member.items()} for member in members]
    received, moved = shuffle_values(gathered, seed=seed, event=event)
    for member, values in zip(members, received, strict=True):
        for kind, tensors in member.items():
            scatter(tensors, mask, values[kind])
    kinds = len(members[0]) if members else 0
    return ShuffleCount(selected=mask.num_selected, moved=moved, members=len(members), kinds=kinds)
