"""Values on the wire: 16-bit types as Flower records (bfloat16 included, which NumPy
lacks), their size, and replies whose arrays do not hold what they claim."""

from __future__ import annotations

import io
import weakref

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from tests.unit.test_protocol import gated_exchange
from wash_fed import wire
from wash_fed.codec import WireFormat
from wash_fed.config import WashFedConfig
from wash_fed.keys import Record
from wash_fed.protocol import Delivery, WashServer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_come_back_bit_for_bit(dtype: torch.dtype) -> None:
    sent = {"w": torch.randn(3, 5).to(dtype), "steps": torch.tensor(7)}
    back = wire.record_to_tensors(wire.tensors_to_record(sent))
    assert back.keys() == sent.keys()
    for name, value in sent.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value)


def test_16_bit_values_take_half_the_bytes() -> None:
    def size(dtype: torch.dtype) -> int:
        values = {"values": torch.randn(100_000).to(dtype)}
        return wire.message_bytes(RecordDict({Record.VALUES: wire.tensors_to_record(values)}))

    full = size(torch.float32)
    for half in (size(torch.bfloat16), size(torch.float16)):
        assert abs(2 * half - full) < 0.002 * full  # framing: a few hundred bytes


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        np.array(2.5, dtype=np.float64),
        np.zeros((0, 5), dtype=np.int64),
        np.arange(6, dtype=np.uint8),
    ],
    ids=["float16", "fortran-order", "scalar", "empty", "uint8"],
)
def test_arrays_read_as_flower_reads_them_into_tensors_of_their_own(values: np.ndarray) -> None:
    array = Array(values)
    (back,) = wire.record_to_tensors(ArrayRecord({"a": array})).values()
    expected = torch.from_numpy(array.numpy())
    assert back.dtype == expected.dtype and torch.equal(back, expected)
    back.add_(1)  # writable, and not a view of the message's bytes
    assert np.array_equal(array.numpy(), values)


@pytest.mark.parametrize(
    "tensor",
    [torch.randn(3, 5), torch.randn(7).half(), torch.tensor(7), torch.randn(4, 3).T],
    ids=["float32", "float16", "scalar", "transposed"],
)
def test_records_hold_what_flowers_own_arrays_hold(tensor: torch.Tensor) -> None:
    (made,) = wire.tensors_to_record({"t": tensor}).values()
    flowers = Array(tensor.contiguous())
    assert (made.data, made.dtype, made.shape) == (flowers.data, flowers.dtype, flowers.shape)


def test_deliveries_held_as_records_take_one_record_each_and_release_their_tensors() -> None:
    mean = {"w": torch.randn(50), "b": torch.randn(3).to(torch.bfloat16)}
    shared = Delivery("mean", 2, mean)
    deliveries = {0: shared, 1: shared, 2: Delivery("values", 2, {"weights": torch.randn(9)})}
    expected = {m: {k: t.clone() for k, t in d.tensors.items()} for m, d in deliveries.items()}
    released = weakref.ref(deliveries[2].tensors["weights"])
    wire.hold_as_records(deliveries)
    assert released() is None  # nothing but the delivery held it
    assert deliveries[0] is deliveries[1]  # the members' shared mean is one record
    for member, delivery in deliveries.items():
        assert isinstance(delivery.tensors, wire.RecordTensors)
        for name, value in expected[member].items():
            assert torch.equal(delivery.tensors[name], value)
        (record,) = wire.delivery_records(delivery)[0].values()
        assert record is delivery.tensors.record  # the messages carry it as it is
        carried = wire.record_to_tensors(record)
        assert all(torch.equal(carried[k], v) for k, v in expected[member].items())


def _npy(values: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        _npy(np.arange(8, dtype=np.float32))[:-4],
        _npy(np.arange(8, dtype=np.float32)) + b"\x00" * 4,
        _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True),
        b"NOTNUMPY" + _npy(np.arange(2))[8:],
    ],
    ids=["short", "trailing-bytes", "pickled-objects", "not-npy"],
)
def test_an_array_whose_bytes_are_not_one_plain_array_is_a_malformed_reply(data: bytes) -> None:
    array = Array(dtype="float32", shape=(8,), stype="numpy.ndarray", data=data)
    content = RecordDict(
        {Record.VALUES: ArrayRecord({"weights": array}), Record.METRICS: MetricRecord({})}
    )
    with pytest.raises(wire.MalformedReplyError, match="unreadable arrays"):
        wire.reply_parts(content, Record.VALUES)


@pytest.mark.parametrize(
    "array",
    [
        Array(dtype="bfloat16", shape=(4,), stype=wire.RAW_BFLOAT16, data=b"\x00" * 6),
        Array(dtype="bfloat16", shape=(2,), stype="numpy.ndarray", data=b"\x00" * 4),
    ],
    ids=["short", "foreign-stype"],
)
def test_a_bfloat16_array_that_lies_about_itself_is_a_malformed_reply(array: Array) -> None:
    content = RecordDict(
        {Record.VALUES: ArrayRecord({"weights": array}), Record.METRICS: MetricRecord({})}
    )
    with pytest.raises(wire.MalformedReplyError, match="unreadable arrays"):
        wire.reply_parts(content, Record.VALUES)


def test_wash_takes_values_only_in_the_runs_wire_dtype() -> None:
    cfg = WashFedConfig.from_mapping(
        {"num-members": 3, "shuffle-prob": 0.5, "wire-dtype": "bfloat16"}
    )
    parameters = {"w": torch.zeros(64)}
    server = WashServer(cfg, [0, 1, 2], parameters)
    selected = cfg.shuffle_mask([64], 1).num_selected
    bfloat16 = WireFormat("bfloat16")
    payloads = {m: bfloat16.encode({"weights": torch.randn(selected)}) for m in (0, 1)}
    payloads[2] = {"weights": torch.randn(selected)}  # float32: not what the run sends
    exchange, rejected = gated_exchange(server, 1, payloads)
    assert "float32" in rejected[2] and set(exchange.deliveries) == {0, 1}
    assert all(d.tensors["weights"].dtype == torch.bfloat16 for d in exchange.deliveries.values())
