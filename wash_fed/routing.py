"""How a ClientApp takes part in the member protocol: every message type routed to one
handler, the node's place in the population, and the choice between the node's member
worker and this process. Imports Flower, not torch (a ClientApp relays to its member worker
without loading it)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import cast

from flwr.app import Context, Message, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp

from wash_fed import worker_link
from wash_fed.keys import MessageType, Metric, NodeConfig, Record

__all__ = ["MEMBER_MESSAGES", "member_app", "member_app_with_worker", "member_index"]

MEMBER_MESSAGES = (
    MessageType.HELLO,
    MessageType.TRAIN,
    MessageType.COLLECT,
    MessageType.BN_STATISTICS,
    MessageType.EVALUATE,
    MessageType.END,
)
"""Every message type of the member protocol (:mod:`wash_fed.keys`)."""


def member_index(node_config: Mapping[str, UserConfigValue], num_members: int) -> int:
    """The node's ``partition-id``, checked against ``num-partitions`` (when given) and the
    run's ``num_members``: a ValueError naming what is wrong."""
    if NodeConfig.PARTITION_ID not in node_config:
        raise ValueError(
            f"node config lacks {NodeConfig.PARTITION_ID!r}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        )
    index = int(cast(int, node_config[NodeConfig.PARTITION_ID]))
    partitions = int(cast(int, node_config.get(NodeConfig.NUM_PARTITIONS, num_members)))
    if partitions != num_members:
        raise ValueError(
            f"node config says num-partitions={partitions}, the run has num-members={num_members}"
        )
    if not 0 <= index < num_members:
        raise ValueError(f"partition-id={index} outside 0..{num_members - 1}")
    return index


def member_app(respond: Callable[[Message, Context], Message]) -> ClientApp:
    """A ClientApp that answers every message type of the member protocol with
    ``respond`` (``<category>.<action>`` routes to Flower's ``train``, ``evaluate`` and
    ``query`` registrations)."""
    app = ClientApp()
    for message_type in MEMBER_MESSAGES:
        category, _, action = message_type.partition(".")
        register = getattr(app, category)
        register(*([action] if action else []))(respond)
    return app


def member_app_with_worker(
    source: Callable[[], worker_link.MemberSource],
    in_process: Callable[[str, RecordDict, Context], RecordDict],
) -> ClientApp:
    """A ClientApp of the member protocol: where the node config names a ``worker-dir``
    (deployments), each message goes to the node's member worker, which keeps the member
    built by what ``source()`` names (called there only); otherwise
    ``in_process(message_type, content, context)`` answers it in this process."""

    def respond(msg: Message, context: Context) -> Message:
        received_at, started = time.time(), time.perf_counter()
        message_type = msg.metadata.message_type
        worker_dir = context.node_config.get(NodeConfig.WORKER_DIR)
        if worker_dir:
            content = worker_link.forward(
                str(worker_dir),
                source(),
                message_type,
                msg.content,
                context.run_id,
                context.run_config,
                context.node_config,
            )
        else:
            content = in_process(message_type, msg.content, context)
        _add_delivery_figures(content, msg, received_at, time.perf_counter() - started)
        return Message(content, reply_to=msg)

    return member_app(respond)


def _add_delivery_figures(
    content: RecordDict, msg: Message, received_at: float, respond_seconds: float
) -> None:
    """What this ClientApp saw of ``msg``'s way to the member (:mod:`wash_fed.timing`),
    into the reply's metrics: when it began handling it, for how long, how long its process
    took to start for it, and when the SuperLink handed it over (where Flower says)."""
    metrics = content.metric_records.get(Record.METRICS)
    if metrics is None:
        return
    age = _process_age()
    startup = age if received_at - age > msg.metadata.created_at else 0.0
    metrics[Metric.RECEIVED_AT] = received_at
    metrics[Metric.RESPOND_SECONDS] = respond_seconds
    metrics[Metric.STARTUP_SECONDS] = startup
    if msg.metadata.delivered_at:
        metrics[Metric.DELIVERED_AT] = datetime.fromisoformat(msg.metadata.delivered_at).timestamp()


_IMPORTED = time.perf_counter()


def _process_age() -> float:
    """Seconds since this process started (Linux: the kernel's record; elsewhere since
    this module was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):
        return time.perf_counter() - _IMPORTED
