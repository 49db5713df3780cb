"""The message vocabulary between the wash-fed ServerApp and ClientApp.

This is the library's one boundary with Flower: message types, record keys, conversions
between tensors and Flower records, and how a message's size is measured. The algorithm
modules never import it.

Round messages (``train``) carry a ``config`` record with ``server-round`` and ``reply``
(what the member must send back) and, when something is due, one payload record:
``values`` (WASH: the values this member receives from the previous shuffle event, at the
mask of event ``values-event``), ``mean`` (PAPA: the population mean of the weights) or
``arrays`` (a full state dict: FedAvg's global model, a soup to evaluate).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import Tensor

from wash_fed.batchnorm import BNStatistics

__all__ = [
    "ARRAYS",
    "BN_STATISTICS",
    "COLLECT",
    "CONFIG",
    "HELLO",
    "MEAN",
    "METRICS",
    "STATS",
    "VALUES",
    "bn_statistics_to_record",
    "config_value",
    "message",
    "message_bytes",
    "metric",
    "record_to_bn_statistics",
    "record_to_tensors",
    "tensors_to_record",
]

ConfigValue = int | float | str | bytes | bool

# Message types (Flower routes "<category>.<action>" to the ClientApp's handlers).
HELLO = "query.hello"
"""Before training: each member checks its data and configuration and says who it is."""
COLLECT = "query.collect"
"""Final step: apply what is still due, reply with the full state dict."""
BN_STATISTICS = "query.bn_statistics"
"""Final step: BatchNorm statistics of the soup in ``arrays`` on the member's own data."""

# Record keys.
CONFIG = "config"
METRICS = "metrics"
VALUES = "values"
MEAN = "mean"
ARRAYS = "arrays"
STATS = "stats"

# What a member sends back from a round (config["reply"]).
REPLY_VALUES = "values"
REPLY_WEIGHTS = "weights"
REPLY_STATE = "state"
REPLY_METRICS = "metrics"


def message(
    node: int,
    message_type: str,
    server_round: int,
    config: Mapping[str, ConfigValue] | None = None,
    arrays: Mapping[str, ArrayRecord] | None = None,
) -> Message:
    """A message to ``node``: a ``config`` record with ``server-round`` (and ``config``'s
    entries) and the given array records."""
    record = ConfigRecord({**(config or {}), "server-round": server_round})
    return Message(
        RecordDict({CONFIG: record, **(arrays or {})}),
        dst_node_id=node,
        message_type=message_type,
        group_id=str(server_round),
    )


def metric(content: RecordDict, key: str) -> float:
    """A numeric entry of the ``metrics`` record."""
    value = content.metric_records[METRICS][key]
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} is {value!r}, not a number")
    return float(value)


def config_value(content: RecordDict, key: str) -> int | float | str | bool | bytes:
    """A scalar entry of the ``config`` record."""
    value = content.config_records[CONFIG][key]
    if not isinstance(value, (int, float, str, bool, bytes)):
        raise TypeError(f"config {key!r} is {value!r}, not a scalar")
    return value


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Tensors (on any device) as an ArrayRecord, keys kept."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """An ArrayRecord as CPU tensors, keys kept."""
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


def bn_statistics_to_record(stats: BNStatistics) -> ArrayRecord:
    """BatchNorm statistics as ``<layer>.mean`` and ``<layer>.var`` arrays; the batch count
    travels as the ``batches`` metric."""
    tensors = {f"{name}.mean": t for name, t in stats.means.items()}
    tensors |= {f"{name}.var": t for name, t in stats.variances.items()}
    return tensors_to_record(tensors)


def record_to_bn_statistics(record: ArrayRecord, batches: int) -> BNStatistics:
    """The inverse of :func:`bn_statistics_to_record`, as CPU tensors."""
    tensors = record_to_tensors(record)
    names = [k.removesuffix(".mean") for k in tensors if k.endswith(".mean")]
    return BNStatistics(
        {n: tensors[f"{n}.mean"] for n in names},
        {n: tensors[f"{n}.var"] for n in names},
        batches,
    )


def message_bytes(content: Message | RecordDict) -> int:
    """Bytes of ``content`` as Flower serializes it for transport.

    The sum over every object in its tree (the message with its metadata, the record dict,
    each record, array and array chunk) of the object's serialized form -- what travels as
    objects over Flower's Fleet API, without the protocol's own request framing.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
