"""The wash-fed ClientApp: one member of the population per SuperNode.

A member is identified by its node's ``partition-id``. Every handler is "forward the message,
reply": where the node config names a ``worker-dir`` (deployments), the member lives in the
node's long-lived member worker (:mod:`wash_fed.worker`, its member built by
:func:`client.task.worker_member`) and this process only relays the message to it -- this
path never imports torch; otherwise (simulation) the member is restored from
``context.state`` in this process (:func:`client.task.handle_in_process`).

Message types and what the member does are in :mod:`wash_fed.keys` and
:class:`client.task.MemberTask`.
"""

from __future__ import annotations

from flwr.app import Context, RecordDict

from wash_fed.routing import member_app_with_worker
from wash_fed.worker_link import MemberSource

WORKER_MEMBER = MemberSource("client.task:worker_member", "factory")
"""What the node's member worker builds its member with."""


def _in_process(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    from client.task import handle_in_process  # torch: only on this path

    return handle_in_process(message_type, content, context)


app = member_app_with_worker(lambda: WORKER_MEMBER, _in_process)
