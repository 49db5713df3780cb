"""Blockwise absmax quantization of values on the wire: 8 bits, or 4 bits two to a byte.

A tensor's values, flattened, are cut into blocks of :data:`BLOCK` (the last one shorter).
Block ``b`` with largest magnitude ``m_b`` gets the scale ``s_b = m_b / q`` (``q`` = 127
for 8 bits, 7 for 4), kept in float32; each value ``x`` travels as the integer
``round(x / s_b)`` in ``[-q, q]``. Decoding gives ``code * s_b``.

Invariants (tested):

- **error bound**: a finite value comes back within ``s_b / 2`` of itself, up to float32
  rounding (``m_b / 254`` for 8 bits, ``m_b / 14`` for 4), and a block's largest magnitude
  comes back exactly up to that rounding; a zero block (scale 0) comes back as zeros;
- **non-finite values stay non-finite**: a block holding a NaN or an infinity gets a NaN
  scale and comes back all NaN, so the reply gate refuses it as it refuses NaN in float;
- **shape and count**: :func:`decode` gives ``numel`` values, reshaped by the caller;
- **size**: ``numel`` bytes (8 bits) or ``ceil(numel / 2)`` (4 bits), plus 4 bytes a block
  (:func:`encoded_bytes`): 26.6% and 14.1% of float32 for blocks of 64.

:class:`WireFormat` applies a format to named tensors: a cast to a 16-bit float type, or
these codes and scales, each quantized tensor ``name`` travelling as two, its codes under
``name`` and its scales under ``name`` + :data:`~wash_fed.keys.SCALES_SUFFIX`. BatchNorm's
running statistics (``<layer>.running_mean`` and ``.running_var`` beside each other) are
not quantized: a block's absmax scale would round a layer's small variances to zero beside
its large ones, and the normalization would divide by almost nothing. They travel as they
are (a few kB: ResNet-18's are 0.1% of its values).

Pure torch; the member protocol decides where it is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from wash_fed.batchnorm import is_running_statistic
from wash_fed.keys import SCALES_SUFFIX

__all__ = [
    "BLOCK",
    "FORMATS",
    "Bits",
    "Encoded",
    "WireFormat",
    "decode",
    "encode",
    "encoded_bytes",
]

BLOCK = 64
"""Values per block: one float32 scale each."""
Bits = Literal[8, 4]
_LEVELS: dict[int, int] = {8: 127, 4: 7}
_CASTS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUANTIZED: dict[str, Bits] = {"int8": 8, "int4": 4}
FORMATS = (*_CASTS, *_QUANTIZED)
"""Every format's name, as ``wire-dtype`` and ``final-dtype`` take it."""


@dataclass(frozen=True)
class Encoded:
    """A tensor's values on the wire: ``codes`` (``int8``, one a value, for 8 bits;
    ``uint8``, two a byte, low nibble first, for 4 bits) and one float32 ``scales`` entry
    a block of :data:`BLOCK` values."""

    codes: Tensor
    scales: Tensor
    bits: Bits


def encoded_bytes(numel: int, bits: Bits, block: int = BLOCK) -> int:
    """Bytes of ``numel`` values encoded: codes and scales."""
    codes = numel if bits == 8 else (numel + 1) // 2
    return codes + 4 * math.ceil(numel / block)


def encode(values: Tensor, bits: Bits, block: int = BLOCK) -> Encoded:
    """``values`` (any shape, floating point) as blockwise ``bits``-bit codes and their
    scales."""
    if bits not in _LEVELS:
        raise ValueError(f"bits={bits}; expected 8 or 4")
    if not values.is_floating_point():
        raise ValueError(f"only floating-point values are quantized, not {values.dtype}")
    levels = _LEVELS[bits]
    flat = values.detach().reshape(-1).to(torch.float32)
    blocks = _padded(flat, block)
    finite = blocks.isfinite().all(dim=1)
    largest = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(0)
    scales = torch.where(finite, largest / levels, torch.full_like(largest, math.nan))
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    codes = (blocks / divisor).round_().clamp_(-levels, levels)
    codes = torch.where(finite.unsqueeze(1), codes, torch.zeros_like(codes))
    codes = codes.reshape(-1)[: flat.numel()].to(torch.int8)
    return Encoded(codes if bits == 8 else _pack4(codes), scales, bits)


def decode(encoded: Encoded, numel: int, block: int = BLOCK) -> Tensor:
    """The ``numel`` float32 values ``encoded`` holds (flat). A ValueError when its codes
    or scales do not hold ``numel`` values."""
    codes = encoded.codes
    expected = numel if encoded.bits == 8 else (numel + 1) // 2
    dtype = torch.int8 if encoded.bits == 8 else torch.uint8
    if codes.dtype != dtype or codes.dim() != 1 or codes.numel() != expected:
        raise ValueError(
            f"{encoded.bits}-bit codes of {numel} values are {expected} {dtype}, "
            f"not {codes.numel()} {codes.dtype} in {codes.dim()} dimension(s)"
        )
    blocks = math.ceil(numel / block)
    scales = encoded.scales
    if scales.dtype != torch.float32 or tuple(scales.shape) != (blocks,):
        raise ValueError(f"{numel} values need {blocks} float32 scales, not {tuple(scales.shape)}")
    values = codes.to(torch.float32) if encoded.bits == 8 else _unpack4(codes, numel)
    per_value = scales.repeat_interleave(block)[:numel]
    return values * per_value


def _padded(flat: Tensor, block: int) -> Tensor:
    """``flat`` as rows of ``block`` values, the last row padded with zeros."""
    rows = math.ceil(flat.numel() / block)
    padded = flat.new_zeros(rows * block)
    padded[: flat.numel()] = flat
    return padded.reshape(rows, block)


def _pack4(codes: Tensor) -> Tensor:
    """Signed 4-bit codes (int8 in [-7, 7]) two to a byte, low nibble first."""
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack4(packed: Tensor, numel: int) -> Tensor:
    """:func:`_pack4`'s codes back, as float32 (``numel`` of them)."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    nibbles = torch.stack([low, high], dim=1).reshape(-1)[:numel]
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.float32)


@dataclass(frozen=True)
class WireFormat:
    """How a run's floating-point tensors travel, by :data:`FORMATS` name: cast to a float
    type (``float32``: as they are), or quantized blockwise (``int8``, ``int4``). Tensors of
    other dtypes (integer counters) travel as they are.

    Invariants: ``decode(encode(t), like=t)`` has ``t``'s names, shapes, dtypes and devices
    (:meth:`through`); each value comes back rounded once, to the float type or within its
    block's bound; a non-finite value comes back non-finite."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ValueError(f"wire format {self.name!r}; expected one of {', '.join(FORMATS)}")

    @property
    def bits(self) -> Bits | None:
        """The quantized formats' bits (None: a float type)."""
        return _QUANTIZED.get(self.name)

    @property
    def exact_dtype(self) -> torch.dtype:
        """The narrowest dtype that holds every value this format decodes to exactly: the
        float type itself, ``float32`` for the quantized formats. Values held in it travel
        on unchanged (:meth:`encode` is then a no-op for them)."""
        return torch.float32 if self.bits is not None else _CASTS[self.name]

    def encode(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` as they travel."""
        out: dict[str, Tensor] = {}
        as_they_are = self._not_quantized(tensors)
        for name, tensor in tensors.items():
            t = tensor.detach()
            if not t.is_floating_point() or name in as_they_are:
                out[name] = t
            elif self.bits is None:
                out[name] = t.to(_CASTS[self.name])
            else:
                encoded = encode(t, self.bits)
                out[name], out[name + SCALES_SUFFIX] = encoded.codes, encoded.scales
        return out

    def _not_quantized(self, tensors: Mapping[str, Tensor]) -> frozenset[str]:
        """The floating-point tensors of ``tensors`` a quantized format sends as they are:
        BatchNorm's running statistics."""
        if self.bits is None:
            return frozenset()
        return frozenset(name for name in tensors if is_running_statistic(name))

    def decode(self, wire: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What ``wire`` (an :meth:`encode` of tensors like ``like``) holds, in ``like``'s
        shapes and dtypes. A ValueError naming the first tensor that is missing, unexpected
        or not of the form ``like``'s would travel in."""
        expected = set(like)
        as_they_are = self._not_quantized(like)
        if self.bits is not None:
            expected |= {
                n + SCALES_SUFFIX
                for n, t in like.items()
                if t.is_floating_point() and n not in as_they_are
            }
        if wire.keys() != expected:
            missing, extra = sorted(expected - wire.keys())[:3], sorted(wire.keys() - expected)[:3]
            raise ValueError(
                f"tensors differ from those expected (missing {missing}, unexpected {extra})"
            )
        return {
            name: self._decoded(name, wire, reference, exact=name in as_they_are)
            for name, reference in like.items()
        }

    def _decoded(self, name: str, wire: Mapping[str, Tensor], like: Tensor, exact: bool) -> Tensor:
        value = wire[name]
        if not like.is_floating_point() or self.bits is None or exact:
            cast = like.is_floating_point() and not exact
            dtype = _CASTS[self.name] if cast else like.dtype
            if value.shape != like.shape or value.dtype != dtype:
                raise ValueError(
                    f"{name!r} is {value.dtype} of shape {tuple(value.shape)}, expected "
                    f"{dtype} of shape {tuple(like.shape)}"
                )
            return value.to(like.dtype)
        try:
            flat = decode(Encoded(value, wire[name + SCALES_SUFFIX], self.bits), like.numel())
        except ValueError as err:
            raise ValueError(f"{name!r}: {err}") from None
        return flat.reshape(like.shape).to(like.dtype)

    def through(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` as they arrive after travelling in this format (``float32``: the
        same values)."""
        return self.decode(self.encode(tensors), tensors)

    def encode_lossless(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor in this format where that changes none of its values (a soup
        already rounded to it), else as it is (recalibrated BatchNorm buffers): for
        :meth:`decode_each`."""
        out: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            one = {name: tensor}
            encoded = self.encode(one)
            lossless = torch.equal(self.decode(encoded, one)[name], tensor)
            out |= encoded if lossless else {name: tensor.detach()}
        return out

    def decode_each(
        self, wire: Mapping[str, Tensor], like: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """What :meth:`encode_lossless` sent, some or all of the tensors of ``like``: each
        decoded from this format where it travelled in it, else taken as it is. A
        ValueError naming a tensor ``like`` lacks or one of neither form."""
        names = [name for name in wire if not name.endswith(SCALES_SUFFIX)]
        unknown = sorted(set(names) - like.keys()) + sorted(
            n
            for n in wire
            if n.endswith(SCALES_SUFFIX) and n.removesuffix(SCALES_SUFFIX) not in wire
        )
        if unknown:
            raise ValueError(f"tensors unknown to the model: {unknown[:3]}")
        out = {}
        for name in names:
            value, reference = wire[name], like[name]
            encoded = {name: value} | (
                {name + SCALES_SUFFIX: wire[name + SCALES_SUFFIX]}
                if name + SCALES_SUFFIX in wire
                else {}
            )
            as_is = value.dtype == reference.dtype and value.shape == reference.shape
            out[name] = (
                value
                if as_is and len(encoded) == 1
                else self.decode(encoded, {name: reference})[name]
            )
        return out
