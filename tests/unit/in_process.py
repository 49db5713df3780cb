"""Members in this process behind Flower's ``Grid``: every message a strategy pushes is
answered at once by its node's member, through the member's real handlers
(:class:`client.task.MemberTask`). The server's code (roster, strategy, ledger grid, final
step) runs as it does against a SuperLink, without Flower's processes: the unit lane's
stand-in for a deployment, and a place to corrupt one member's replies."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Message, RecordDict
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_res_message as unavailable,
)
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from client.task import MemberTask
from wash_fed.config import WashFedConfig
from wash_fed.keys import NodeConfig

FIRST_NODE = 101
"""Member ``p`` sits on node ``FIRST_NODE + p``."""

Tamper = Callable[[int, str, RecordDict], bool | None]
"""Changes member ``p``'s reply content to a message of a type, in place; True drops the
reply (the member never answers that message)."""


class InProcessGrid(Grid):
    """A Grid whose nodes are members of ``cfg`` in this process. ``tamper`` (if given) sees
    every reply before the server does."""

    def __init__(self, cfg: WashFedConfig, tamper: Tamper | None = None) -> None:
        count = cfg.num_members
        self.members = {
            FIRST_NODE + p: MemberTask(
                cfg, p, {NodeConfig.PARTITION_ID: p, NodeConfig.NUM_PARTITIONS: count}
            )
            for p in range(count)
        }
        self.tamper = tamper
        self.absent: set[int] = set()
        """Nodes that receive messages but never answer."""
        self.unreachable: set[int] = set()
        """Nodes the SuperLink answers for: Flower's own node-unavailable error."""
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.members)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            ids.append(message_id)
            node = message.metadata.dst_node_id
            if node in self.unreachable:
                self._replies[message_id] = unavailable(message.metadata, "node_unavail")
                continue
            if node in self.absent:
                continue
            kind = message.metadata.message_type
            content = self.members[node].handle(kind, copy.deepcopy(message.content))
            if self.tamper is not None and self.tamper(node - FIRST_NODE, kind, content):
                continue
            self._replies[message_id] = Message(content, reply_to=message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
