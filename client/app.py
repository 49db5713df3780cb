"""The wash-fed ClientApp: one member of the population per SuperNode.

A member is identified by its node's ``partition-id``. Every handler is "forward the message,
reply": where the node config names a ``worker-dir`` (deployments), the member lives in the
node's long-lived member worker (:mod:`client.worker`) and this process only relays the
message to it -- this path never imports torch; otherwise (simulation) the member is
restored from ``context.state`` in this process (:func:`client.task.handle_in_process`).

Message types and what the member does are in :mod:`wash_fed.keys` and
:class:`client.task.MemberTask`.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from client import worker_link
from wash_fed.keys import NodeConfig
from wash_fed.routing import member_app


def _respond(msg: Message, context: Context) -> Message:
    """The member's reply to ``msg``, from the node's worker or from this process."""
    message_type = msg.metadata.message_type
    worker_dir = context.node_config.get(NodeConfig.WORKER_DIR)
    content: RecordDict
    if worker_dir:
        content = worker_link.forward(
            str(worker_dir),
            message_type,
            msg.content,
            context.run_id,
            context.run_config,
            context.node_config,
        )
    else:
        from client.task import handle_in_process  # torch: only on this path

        content = handle_in_process(message_type, msg.content, context)
    return Message(content, reply_to=msg)


app = member_app(_respond)
