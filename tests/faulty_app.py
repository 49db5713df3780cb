"""A ClientApp in which one member corrupts its replies (tests only).

The test copies the app into a folder of its own, puts this module there as
``faulty/app.py`` beside ``faulty/fault.py`` (``FAULT``, ``MEMBER``), and runs that copy
through ``flwr run``. Every member trains honestly; member ``MEMBER`` then corrupts what it
sends according to ``FAULT``:

* ``crash-shaped``: round replies with a missing, an extra, a renamed or a mistyped record;
* ``nan``, ``scaled``: its shuffled values are NaN or x1000;
* ``final-step``: its BatchNorm statistics of the soup are shifted and claim 10^9 batches,
  and its evaluations report an accuracy of 1.5;
* ``none``: nothing (the honest reference run).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from faulty.fault import FAULT, MEMBER  # type: ignore[import-not-found]
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import member_app
from client.task import handle_in_process


def _map_values(content: RecordDict, change: Callable[[np.ndarray], np.ndarray]) -> None:
    record = content.array_records["values"]
    content["values"] = ArrayRecord(
        {kind: Array(change(array.numpy())) for kind, array in record.items()}
    )


def _crash_shaped(content: RecordDict, server_round: int) -> None:
    shape = server_round % 4
    if shape == 1:
        del content["values"]
    elif shape == 2:
        content["bonus"] = ConfigRecord({"free": "lunch"})
    elif shape == 3:
        record = content.array_records["values"]
        content["values"] = ArrayRecord({f"{k}-renamed": v for k, v in record.items()})
    else:
        content["values"] = ConfigRecord({"weights": "not an array"})


def _corrupt(message_type: str, server_round: int, content: RecordDict) -> None:
    if message_type == "train" and "values" in content:
        changes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "nan": lambda a: np.full_like(a, np.nan),
            "scaled": lambda a: a * 1000,
        }
        if FAULT in changes:
            _map_values(content, changes[FAULT])
        elif FAULT == "crash-shaped":
            _crash_shaped(content, server_round)
    elif message_type == "query.bn_statistics" and FAULT == "final-step":
        record = content.array_records["stats"]
        content["stats"] = ArrayRecord(
            {
                k: Array(v.numpy() + (10.0 if k.endswith(".mean") else 0.0))
                for k, v in record.items()
            }
        )
        content.metric_records["metrics"]["batches"] = 10**9
    elif message_type == "evaluate" and FAULT == "final-step":
        metrics: MetricRecord = content.metric_records["metrics"]
        if "accuracy" in metrics:
            metrics["accuracy"] = 1.5


def _respond(msg: Message, context: Context) -> Message:
    message_type = msg.metadata.message_type
    content = handle_in_process(message_type, msg.content, context)
    if int(context.node_config["partition-id"]) == MEMBER:
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        _corrupt(message_type, server_round, content)
    return Message(content, reply_to=msg)


app = member_app(_respond)
