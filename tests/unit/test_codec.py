"""Blockwise 8- and 4-bit codes: each value back within half its block's scale, zero and
constant blocks exact, non-finite blocks still non-finite, sizes as counted, malformed
codes refused."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wash_fed.codec import BLOCK, FORMATS, Bits, Encoded, WireFormat, decode, encode, encoded_bytes
from wash_fed.keys import SCALES_SUFFIX

BITS: list[Bits] = [8, 4]


def round_trip(values: torch.Tensor, bits: Bits) -> torch.Tensor:
    return decode(encode(values, bits), values.numel()).reshape(values.shape)


def assert_within_bound(values: torch.Tensor, back: torch.Tensor, bits: Bits) -> None:
    """Every value within half its block's scale (and float32's rounding) of itself."""
    levels = 127 if bits == 8 else 7
    flat, got = values.reshape(-1).float(), back.reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        block, decoded = flat[start : start + BLOCK], got[start : start + BLOCK]
        scale = block.abs().max() / levels
        bound = scale / 2 + 1e-6 * block.abs().max() + 1e-38
        assert (block - decoded).abs().max() <= bound, (start, scale)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "values",
    [
        torch.randn(1000),  # random, a last block of 40
        torch.full((3, 70), -2.5),  # constant blocks
        torch.zeros(130),  # zero blocks
        torch.cat([torch.full((64,), 1e30), torch.full((64,), 1e-30)]),  # huge and tiny
        torch.linspace(-1e6, 1e6, 257),  # a wide range within blocks
        torch.randn(5).to(torch.float16),  # another dtype, one short block
    ],
    ids=["random", "constant", "zero", "huge-tiny", "wide", "float16"],
)
def test_every_value_comes_back_within_half_its_blocks_scale(
    values: torch.Tensor, bits: Bits
) -> None:
    back = round_trip(values, bits)
    assert back.shape == values.shape and back.dtype == torch.float32
    assert_within_bound(values, back, bits)


@pytest.mark.parametrize("bits", BITS)
def test_zero_and_constant_blocks_are_exact(bits: Bits) -> None:
    values = torch.cat([torch.zeros(BLOCK), torch.full((BLOCK,), 0.375)])
    assert torch.equal(round_trip(values, bits), values)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_makes_its_block_non_finite_and_no_other(bits: Bits, bad: float) -> None:
    values = torch.randn(3 * BLOCK)
    values[BLOCK + 5] = bad
    back = round_trip(values, bits)
    assert back[BLOCK : 2 * BLOCK].isnan().all(), "the reply gate refuses the block"
    assert back[:BLOCK].isfinite().all() and back[2 * BLOCK :].isfinite().all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("numel", [1, 63, 64, 65, 1001])
def test_the_bytes_counted_are_the_bytes_encoded(bits: Bits, numel: int) -> None:
    encoded = encode(torch.randn(numel), bits)
    actual = encoded.codes.numel() * encoded.codes.element_size() + 4 * encoded.scales.numel()
    assert encoded_bytes(numel, bits) == actual
    assert encoded_bytes(64_000, 8) / (4 * 64_000) == pytest.approx(0.266, abs=1e-3)
    assert encoded_bytes(64_000, 4) / (4 * 64_000) == pytest.approx(0.141, abs=1e-3)


def test_four_bit_codes_use_every_level_and_pack_two_to_a_byte() -> None:
    values = torch.arange(-7, 8, dtype=torch.float32)  # one block: scale 1, codes -7..7
    encoded = encode(values, 4)
    assert encoded.codes.dtype == torch.uint8 and encoded.codes.numel() == 8
    assert torch.equal(decode(encoded, values.numel()), values)


@pytest.mark.parametrize(
    ("encoded", "numel", "named"),
    [
        (Encoded(torch.zeros(10, dtype=torch.int8), torch.zeros(1), 8), 11, "11 values"),
        (Encoded(torch.zeros(6, dtype=torch.int8), torch.zeros(1), 4), 11, "uint8"),
        (Encoded(torch.zeros(70, dtype=torch.int8), torch.zeros(1), 8), 70, "2 float32 scales"),
        (Encoded(torch.zeros(8, dtype=torch.int8), torch.zeros(1).double(), 8), 8, "scales"),
    ],
)
def test_codes_or_scales_of_the_wrong_form_are_refused(
    encoded: Encoded, numel: int, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        decode(encoded, numel)


def test_only_floating_point_values_and_known_widths_are_encoded() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        encode(torch.arange(4), 8)
    with pytest.raises(ValueError, match="bits=2"):
        encode(torch.randn(4), 2)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from(BITS),
)
def test_the_bound_holds_for_any_finite_values(values: list[float], bits: Bits) -> None:
    tensor = torch.tensor(values, dtype=torch.float32)
    assert_within_bound(tensor, round_trip(tensor, bits), bits)


STATE = {
    "conv.weight": torch.randn(8, 3, 3, 3),
    "bn.running_mean": torch.randn(8),
    "bn.num_batches_tracked": torch.tensor(7),
    "fc.bias": torch.randn(10).to(torch.float64),
}


@pytest.mark.parametrize("name", FORMATS)
def test_a_format_brings_tensors_back_in_their_names_shapes_and_dtypes(name: str) -> None:
    wire_format = WireFormat(name)
    back = wire_format.through(STATE)
    assert back.keys() == STATE.keys()
    for key, tensor in STATE.items():
        assert back[key].shape == tensor.shape and back[key].dtype == tensor.dtype, key
    assert torch.equal(back["bn.num_batches_tracked"], STATE["bn.num_batches_tracked"])
    if wire_format.bits is not None:
        assert_within_bound(STATE["conv.weight"], back["conv.weight"], wire_format.bits)
    else:
        cast = STATE["conv.weight"].to(getattr(torch, name)).float()
        assert torch.equal(back["conv.weight"], cast), "rounded once to the float type"


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_quantized_tensor_travels_as_codes_and_scales_of_the_counted_size(name: str) -> None:
    wire_format = WireFormat(name)
    wire = wire_format.encode(STATE)
    assert wire.keys() == STATE.keys() | {f"{k}{SCALES_SUFFIX}" for k in ("conv.weight", "fc.bias")}
    bits = wire_format.bits
    assert bits is not None
    nbytes = wire["conv.weight"].nbytes + wire[f"conv.weight{SCALES_SUFFIX}"].nbytes
    assert nbytes == encoded_bytes(STATE["conv.weight"].numel(), bits)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_batchnorm_statistics_travel_as_they_are_in_a_quantized_format(name: str) -> None:
    # absmax blocks would round the small variances to zero beside the large one
    variances = torch.tensor([5.0] + [0.01] * 63)
    state = {"bn.weight": torch.ones(64), "bn.running_var": variances, **STATE}
    wire = WireFormat(name).encode(state)
    assert f"bn.running_var{SCALES_SUFFIX}" not in wire
    assert f"bn.weight{SCALES_SUFFIX}" in wire, "a BatchNorm weight is quantized"
    back = WireFormat(name).decode(wire, state)
    for statistic in ("bn.running_var", "bn.running_mean"):
        assert torch.equal(back[statistic], state[statistic]), statistic


@pytest.mark.parametrize(
    ("name", "spoil", "named"),
    [
        ("int8", lambda w: w.pop(f"conv.weight{SCALES_SUFFIX}"), "missing"),
        ("int4", lambda w: w.__setitem__("conv.weight", w["conv.weight"][:-1]), "'conv.weight'"),
        ("int8", lambda w: w.__setitem__("extra", torch.zeros(1)), "unexpected ['extra']"),
        ("float16", lambda w: w.__setitem__("fc.bias", w["fc.bias"].float()), "'fc.bias'"),
        ("float16", lambda w: w.__setitem__("bn.running_mean", torch.zeros(9).half()), "(9,)"),
    ],
)
def test_a_wire_of_the_wrong_form_is_refused_naming_what_is_wrong(
    name: str, spoil: Callable[[dict[str, torch.Tensor]], object], named: str
) -> None:
    wire = WireFormat(name).encode(STATE)
    spoil(wire)
    with pytest.raises(ValueError, match=re.escape(named)):
        WireFormat(name).decode(wire, STATE)


@pytest.mark.parametrize("name", FORMATS)
def test_a_non_finite_value_arrives_non_finite(name: str) -> None:
    spoiled = {"w": torch.tensor([1.0, math.nan, 2.0]), "v": torch.tensor([math.inf, 0.0])}
    back = WireFormat(name).through(spoiled)
    assert not back["w"].isfinite().all() and not back["v"].isfinite().all()


def test_an_unknown_format_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="int4"):
        WireFormat("int2")


@pytest.mark.parametrize("name", FORMATS)
def test_a_rounded_soup_travels_in_the_format_and_other_buffers_as_they_are(name: str) -> None:
    wire_format = WireFormat(name)
    soup = wire_format.through(STATE)
    recalibrated = {**soup, "bn.running_mean": torch.randn(8) / 3}  # not rounded to it
    sent = wire_format.encode_lossless(recalibrated)
    if name != "float32":
        assert sent["bn.running_mean"].dtype == torch.float32, "a buffer it would round"
        assert sent["conv.weight"].dtype != torch.float32, "the soup, in the format"
    back = wire_format.decode_each(sent, STATE)
    assert back.keys() == STATE.keys()
    for key, tensor in recalibrated.items():
        assert torch.equal(back[key], tensor) and back[key].dtype == tensor.dtype, key
    patch = wire_format.decode_each({k: v for k, v in sent.items() if k.startswith("bn.")}, STATE)
    assert set(patch) == {"bn.running_mean", "bn.num_batches_tracked"}
    with pytest.raises(ValueError, match="unknown to the model"):
        wire_format.decode_each({"extra": torch.zeros(1)}, STATE)
