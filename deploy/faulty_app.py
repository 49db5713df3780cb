"""A ClientApp in which one member corrupts its replies: what the tests and the
poisoned-member benchmark hold the reply gate against.

:func:`deploy.app_copies.faulty_app_copy` copies the app into a folder of its own, puts
this module there as ``faulty/app.py`` beside ``faulty/fault.py`` (``FAULT``, ``MEMBER``),
and that copy runs through ``flwr run``. Every member trains honestly; member ``MEMBER``
then corrupts what it sends according to ``FAULT``:

* ``crash-shaped``: round replies (the last one's, its model, too) with a missing, an extra,
  a renamed or a mistyped record;
* ``nan``, ``scaled``, ``sign-flip``, ``zeros``: the values of its round replies (WASH's
  shuffled values, FedAvg's model) are NaN, x1000, negated or zero;
* ``drift``: they are scaled by 1.05 more every round (a slowly growing copy);
* ``false-id``: its round replies report another member's partition id;
* ``final-step``: its BatchNorm statistics of the soup are shifted and claim 10^9 batches,
  and its evaluations report an accuracy of 1.5;
* ``absent``: it never answers a round (its train handler raises): the reference for the
  round faults;
* ``absent-final``: it trains honestly but never answers for BatchNorm statistics or an
  evaluation: the reference for ``final-step``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from faulty.fault import FAULT, MEMBER  # type: ignore[import-not-found]
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.task import handle_in_process
from wash_fed.keys import Config, MessageType, Metric, NodeConfig, Record
from wash_fed.routing import member_app


def _map_values(content: RecordDict, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """``change`` applied to the floating-point arrays of record ``name``."""

    def changed(a: np.ndarray) -> np.ndarray:
        return change(a).astype(a.dtype) if np.issubdtype(a.dtype, np.floating) else a

    record = content.array_records[name]
    content[name] = ArrayRecord({k: Array(changed(array.numpy())) for k, array in record.items()})


def _crash_shaped(content: RecordDict, name: str, server_round: int) -> None:
    """Record ``name`` (the reply's payload) missing, beside an extra one, renamed entries
    or mistyped, by round."""
    shape = server_round % 4
    if shape == 1:
        del content[name]
    elif shape == 2:
        content["bonus"] = ConfigRecord({"free": "lunch"})
    elif shape == 3:
        record = content.array_records[name]
        content[name] = ArrayRecord({f"{k}-renamed": v for k, v in record.items()})
    else:
        content[name] = ConfigRecord({"weights": "not an array"})


def _corrupt(message_type: str, server_round: int, content: RecordDict) -> None:
    if message_type == MessageType.TRAIN:
        changes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "nan": lambda a: np.full_like(a, np.nan),
            "scaled": lambda a: a * 1000,
            "sign-flip": lambda a: -a,
            "zeros": np.zeros_like,
            "drift": lambda a: a * 1.05**server_round,
        }
        values = next((r for r in (Record.VALUES, Record.ARRAYS) if r in content), None)
        if FAULT in changes and values is not None:
            _map_values(content, values, changes[FAULT])
        elif FAULT == "crash-shaped" and values is not None:
            _crash_shaped(content, values, server_round)
        elif FAULT == "false-id":
            content.metric_records[Record.METRICS][Metric.PARTITION_ID] = (MEMBER + 1) % 4
    elif message_type == MessageType.BN_STATISTICS and FAULT == "final-step":
        record = content.array_records[Record.STATS]
        content[Record.STATS] = ArrayRecord(
            {
                k: Array(v.numpy() + (10.0 if k.endswith(".mean") else 0.0))
                for k, v in record.items()
            }
        )
        content.metric_records[Record.METRICS][Metric.BATCHES] = 10**9
    elif message_type in (MessageType.EVALUATE, MessageType.END) and FAULT == "final-step":
        metrics: MetricRecord = content.metric_records[Record.METRICS]
        if Metric.ACCURACY in metrics:
            metrics[Metric.ACCURACY] = 1.5


ABSENT = {
    "absent": {MessageType.TRAIN},
    "absent-final": {MessageType.BN_STATISTICS, MessageType.EVALUATE, MessageType.END},
}


def _respond(msg: Message, context: Context) -> Message:
    message_type = msg.metadata.message_type
    faulty = int(context.node_config[NodeConfig.PARTITION_ID]) == MEMBER
    if faulty and message_type in ABSENT.get(FAULT, ()):
        raise RuntimeError(f"member {MEMBER} does not answer {message_type}")
    content = handle_in_process(message_type, msg.content, context)
    if faulty:
        config = msg.content.config_records[Record.CONFIG]
        server_round = int(config[Config.SERVER_ROUND])  # type: ignore[arg-type]
        _corrupt(message_type, server_round, content)
    return Message(content, reply_to=msg)


app = member_app(_respond)
