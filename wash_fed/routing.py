"""How a ClientApp takes part in the member protocol: every message type routed to one
handler, the node's place in the population, and the choice between the node's member
worker and this process. Imports Flower, not torch (a ClientApp relays to its member worker
without loading it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

from flwr.app import Context, Message, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp

from wash_fed import worker_link
from wash_fed.keys import MessageType, NodeConfig

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
        return Message(content, reply_to=msg)

    return member_app(respond)
