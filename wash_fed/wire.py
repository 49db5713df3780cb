"""Conversions between the member protocol and Flower records.

This is the library's one boundary with Flower (besides the torch-free names in
:mod:`wash_fed.keys`): tensors, deliveries, payloads and BatchNorm statistics as records,
and how a message's size is measured. The algorithm modules never import it.

A round message (``train``) carries a ``config`` record with ``server-round`` and ``reply``
(what the member must send back) and, when something is due, the delivery: a ``values``
(WASH) or ``mean`` (PAPA) record, with ``delivery-event`` in ``config``. Flower's FedAvg
sends its global model as ``arrays`` instead.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode, SType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import Tensor

from wash_fed.batchnorm import BNStatistics
from wash_fed.gate import check_metrics
from wash_fed.keys import Config, Metrics, Record, Reply, ReplyKind
from wash_fed.protocol import Delivery

__all__ = [
    "ConfigValue",
    "MalformedReplyError",
    "RecordTensors",
    "ReplyParts",
    "bn_statistics_to_record",
    "config_value",
    "delivery_from_content",
    "delivery_records",
    "hold_as_records",
    "is_member_error",
    "message",
    "message_bytes",
    "metric",
    "payload_record",
    "payload_records",
    "record_to_tensors",
    "reply_parts",
    "tensors_to_bn_statistics",
    "tensors_to_record",
]

ConfigValue = ConfigRecordValues
"""An entry of a message's config record."""

_PAYLOAD_RECORD: dict[str, str] = {
    Reply.VALUES: Record.VALUES,
    Reply.WEIGHTS: Record.ARRAYS,
    Reply.STATE: Record.ARRAYS,
    Reply.FINAL: Record.ARRAYS,
}
"""The record that carries each kind of round reply (``metrics`` replies carry none)."""


def message(
    node: int,
    message_type: str,
    server_round: int,
    config: Mapping[str, ConfigValue] | None = None,
    arrays: Mapping[str, ArrayRecord] | None = None,
    ttl: float | None = None,
) -> Message:
    """A message to ``node``: a ``config`` record with ``server-round`` (and ``config``'s
    entries) and the given array records; it expires after ``ttl`` seconds if given."""
    record = ConfigRecord({**(config or {}), Config.SERVER_ROUND: server_round})
    return Message(
        RecordDict({Record.CONFIG: record, **(arrays or {})}),
        dst_node_id=node,
        message_type=message_type,
        group_id=str(server_round),
        ttl=ttl,
    )


def metric(content: RecordDict, key: str, default: float | None = None) -> float:
    """A numeric entry of the ``metrics`` record (``default`` where it is absent, if given)."""
    metrics = content.metric_records[Record.METRICS]
    if default is not None and key not in metrics:
        return default
    value = metrics[key]
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} is {value!r}, not a number")
    return float(value)


def config_value(content: RecordDict, key: str, record: str = Record.CONFIG) -> ConfigValue:
    """A scalar entry of a config record (``config`` unless ``record`` names another)."""
    value = content.config_records[record][key]
    if not isinstance(value, (int, float, str, bool, bytes)):
        raise TypeError(f"{record} entry {key!r} is {value!r}, not a scalar")
    return value


BFLOAT16 = "bfloat16"
RAW_BFLOAT16 = "torch.bfloat16.raw"
"""The ``stype`` of an Array holding bfloat16 values as raw little-endian bytes (NumPy,
which Flower's arrays use, has no bfloat16)."""


def _over_bytes(values: npt.NDArray[Any], bfloat16: bool) -> Tensor:
    """A tensor over ``values``, which lie in an Array's immutable bytes: read only (torch
    cannot mark a tensor so, hence its warning, silenced here); bfloat16 from int16. Only
    the records this process made are viewed so; what arrives is copied (:func:`_tensor`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if bfloat16 else tensor


def _array_and_view(tensor: Tensor) -> tuple[Array, Tensor]:
    """``tensor`` as an Array, its bytes copied once: in NumPy's format, byte for byte what
    ``Array(tensor)`` holds (which copies them twice), or raw little-endian bytes for
    bfloat16; and a read-only view of the Array's values."""
    tensor = tensor.detach().cpu().contiguous()
    bfloat16 = tensor.dtype == torch.bfloat16
    if bfloat16:
        values = tensor.view(torch.int16).numpy().astype("<i2", copy=False)
        header = b""
        array = Array(
            dtype=BFLOAT16, shape=tuple(tensor.shape), stype=RAW_BFLOAT16, data=values.tobytes()
        )
    else:
        values = tensor.numpy()
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, np.lib.format.header_data_from_array_1_0(values)
        )
        header = buffer.getvalue()
        data = b"".join([header, values.reshape(-1).data])
        array = Array(dtype=str(values.dtype), shape=values.shape, stype=SType.NUMPY, data=data)
    view = np.frombuffer(array.data, values.dtype, count=values.size, offset=len(header))
    return array, _over_bytes(view.reshape(values.shape), bfloat16)


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _npy_values(array: Array) -> npt.NDArray[Any]:
    """The values an Array in NumPy's format holds, a read-only view of its bytes (no copy;
    ``Array.numpy`` reads them through a file object a piece at a time and copies them
    twice). Raises ValueError for bytes that are not one array of plain values (as
    ``Array.numpy``, no pickled objects) and TypeError for another serialization."""
    if array.stype != SType.NUMPY:
        raise TypeError(f"arrays of stype {array.stype!r} are not read here")
    data = array.data
    header = io.BytesIO(data)
    version = np.lib.format.read_magic(header)
    if version not in _NPY_HEADERS:
        raise ValueError(f"NumPy format version {version} is not read here")
    shape, fortran_order, dtype = _NPY_HEADERS[version](header)
    if dtype.hasobject:
        raise ValueError(f"an array of {dtype} holds Python objects")
    count, offset = math.prod(shape), header.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} bytes of values for {count} {dtype} values")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return values.reshape(shape[::-1]).T if fortran_order else values.reshape(shape)


def _tensor(array: Array) -> Tensor:
    """The tensor an Array from anywhere holds, of its own (its bytes copied once). Raises
    ValueError or TypeError for one that does not hold what it says."""
    if array.dtype != BFLOAT16:
        values = _npy_values(array)
    else:
        shape = tuple(array.shape)
        if array.stype != RAW_BFLOAT16 or len(array.data) != 2 * math.prod(shape):
            raise ValueError(
                f"a bfloat16 array of shape {shape} that is not {len(array.data)} bytes"
            )
        values = np.frombuffer(array.data, dtype="<i2").reshape(shape)
    tensor = torch.from_numpy(values.copy())  # writable, C order
    return tensor.view(torch.bfloat16) if array.dtype == BFLOAT16 else tensor


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Tensors (on any device, bfloat16 included) as an ArrayRecord, keys kept."""
    return ArrayRecord({k: _array_and_view(v)[0] for k, v in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """An ArrayRecord as CPU tensors, keys kept. Raises ValueError for an array that does not
    hold what it says."""
    return {k: _tensor(v) for k, v in record.items()}


class RecordTensors(Mapping[str, Tensor]):
    """Tensors held as the ArrayRecord that carries them (:attr:`record`, made once), each a
    read-only view of its array's bytes: a delivery that waits for its messages (for several
    rounds, if its member fails) takes its size once, not once as tensors and once more per
    message."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        made = {name: _array_and_view(tensor) for name, tensor in tensors.items()}
        self.record = ArrayRecord({name: array for name, (array, _) in made.items()})
        self._views = {name: view for name, (_, view) in made.items()}

    def __reduce__(self) -> tuple[type[RecordTensors], tuple[dict[str, Tensor]]]:
        """Pickled (in the server's checkpoint) as its tensors alone, once: the record is
        made again where it is loaded (a record that was sent holds Flower's chunks of its
        bytes, which do not pickle)."""
        return RecordTensors, (dict(self._views),)

    def __getitem__(self, name: str) -> Tensor:
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


def hold_as_records(deliveries: dict[int, Delivery]) -> None:
    """Hold each of ``deliveries``' tensors as the record that will carry them
    (:class:`RecordTensors`; one record for a delivery several members share), one delivery
    at a time, so that each one's tensors are released (when nothing else holds them)
    before the next one's record is made."""
    held: dict[int, Delivery] = {}
    for member, delivery in deliveries.items():
        if id(delivery) not in held:
            held[id(delivery)] = replace(delivery, tensors=RecordTensors(delivery.tensors))
        deliveries[member] = held[id(delivery)]


def delivery_records(
    delivery: Delivery | None,
) -> tuple[dict[str, ArrayRecord], dict[str, ConfigValue]]:
    """A delivery as the array record and config entries of the message that carries it."""
    if delivery is None:
        return {}, {}
    tensors = delivery.tensors
    record = tensors.record if isinstance(tensors, RecordTensors) else tensors_to_record(tensors)
    return {delivery.kind: record}, {Config.DELIVERY_EVENT: delivery.event}


def delivery_from_content(content: RecordDict) -> Delivery | None:
    """The delivery a message carries, if any (the inverse of :func:`delivery_records`)."""
    for kind in ("values", "mean"):
        if kind in content.array_records:
            event = config_value(content, Config.DELIVERY_EVENT)
            if not isinstance(event, int) or isinstance(event, bool):
                raise TypeError(f"{Config.DELIVERY_EVENT} is {event!r}, not an integer")
            return Delivery(kind, event, record_to_tensors(content.array_records[kind]))
    return None


def payload_records(reply: ReplyKind, payload: Mapping[str, Tensor]) -> dict[str, ArrayRecord]:
    """A member's round payload as the records of its reply."""
    if reply not in _PAYLOAD_RECORD:
        return {}
    return {_PAYLOAD_RECORD[reply]: tensors_to_record(payload)}


def payload_record(reply: ReplyKind) -> str | None:
    """The record that carries a round reply's payload (``None``: metrics only)."""
    return _PAYLOAD_RECORD.get(reply)


class MalformedReplyError(ValueError):
    """A reply whose records are not what the protocol says: names, types or arrays."""


@dataclass(frozen=True)
class ReplyParts:
    """A reply's content, checked for form: its one array record as tensors (if any), its
    metrics and its config record (if any)."""

    tensors: dict[str, Tensor]
    metrics: Metrics
    config: dict[str, ConfigValue]


def reply_parts(
    content: RecordDict, arrays: str | None = None, config: str | None = None
) -> ReplyParts:
    """Split a reply into its parts, insisting on exactly the records the protocol names:
    ``metrics`` (a MetricRecord), ``arrays`` (an ArrayRecord) and ``config`` (a
    ConfigRecord) when given, nothing else, and metrics the protocol knows, finite and in
    range (:func:`wash_fed.gate.check_metrics`). Raises :class:`MalformedReplyError` saying
    what is wrong."""
    expected: dict[str, type] = {Record.METRICS: MetricRecord}
    if arrays is not None:
        expected[arrays] = ArrayRecord
    if config is not None:
        expected[config] = ConfigRecord
    if set(content) != set(expected):
        raise MalformedReplyError(f"records {sorted(content)}, expected {sorted(expected)}")
    for name, kind in expected.items():
        if not isinstance(content[name], kind):
            raise MalformedReplyError(
                f"record {name!r} is a {type(content[name]).__name__}, not a {kind.__name__}"
            )
    try:
        tensors = record_to_tensors(content.array_records[arrays]) if arrays else {}
    except (TypeError, ValueError) as err:
        raise MalformedReplyError(f"record {arrays!r} holds unreadable arrays ({err})") from None
    metrics = dict(content.metric_records[Record.METRICS])
    problem = check_metrics(metrics)
    if problem is not None:
        raise MalformedReplyError(problem)
    return ReplyParts(
        tensors,
        cast(Metrics, metrics),  # numbers: check_metrics says so
        dict(content.config_records[config]) if config else {},
    )


def bn_statistics_to_record(stats: BNStatistics) -> ArrayRecord:
    """BatchNorm statistics as ``<layer>.mean`` and ``<layer>.var`` arrays; the batch count
    travels as the ``batches`` metric."""
    return tensors_to_record(stats.named_tensors())


def tensors_to_bn_statistics(tensors: Mapping[str, Tensor], batches: int) -> BNStatistics:
    """The inverse of :func:`bn_statistics_to_record` (given its tensors); raises
    :class:`MalformedReplyError` when a layer lacks its mean or its variance."""
    names = {k.removesuffix(".mean") for k in tensors if k.endswith(".mean")}
    if {f"{n}.{kind}" for n in names for kind in ("mean", "var")} != set(tensors):
        raise MalformedReplyError("BatchNorm statistics are not pairs of <layer>.mean, .var")
    return BNStatistics(
        {n: tensors[f"{n}.mean"] for n in sorted(names)},
        {n: tensors[f"{n}.var"] for n in sorted(names)},
        batches,
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 300


def error_reason(reply: Message) -> str:
    """Why a reply is an error, in one line: the message of the member's exception, not the
    traceback (and Ray's wrapping of it) that Flower puts in the reason."""
    text = _ANSI.sub("", str(reply.error.reason))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"error code {reply.error.code}"
    reason = lines[-1].rstrip("'>")
    if "Message: " in reason:
        reason = reason.split("Message: ", 1)[1]
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"


_MEMBER_ERRORS = frozenset(
    {
        ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        ErrorCode.CLIENT_APP_CRASHED,
    }
)


def is_member_error(reply: Message) -> bool:
    """Whether an error reply is the member's own doing (its ClientApp raised, crashed or
    could not load), not its node being unreachable (which a restarted node recovers
    from under a new node id)."""
    return reply.has_error() and reply.error.code in _MEMBER_ERRORS


def message_bytes(content: Message | RecordDict) -> int:
    """Bytes of ``content`` as Flower serializes it for transport.

    The sum over every object in its tree (the message with its metadata, the record dict,
    each record, array and array chunk) of the object's serialized form -- what travels as
    objects over Flower's Fleet API, without the protocol's own request framing.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
