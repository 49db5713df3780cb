"""WASH in your own ClientApp: a member of the population around your model, optimizer and
training loop (a boundary module: it imports Flower).

::

    def member(context: Context) -> MemberParts:
        model = Net()
        return MemberParts(model, MyTask(context), torch.optim.AdamW(model.parameters()))

    app = wash_client_app(member)

The node's ``partition-id`` is the member's place in the population (Flower's simulation
sets it; a SuperNode gets it with ``--node-config``). The server's first message, its
``query.hello``, carries the settings every member shares
(:class:`wash_fed.config.MemberSettings`); the member is built then, by the function given,
and kept in ``context.state`` from one message to the next (model, optimizer state, the
newest delivery applied, the task's own :meth:`~wash_fed.clientapp.Task.state_dict`).

Where the node config names a ``worker-dir`` (a SuperNode started with
``--node-config "... worker-dir=<folder>"``), the member lives in the node's member worker
instead (:mod:`wash_fed.worker`): one process for the whole run that imports the function
by name (so it must be defined at a module's top level) and keeps the member in memory,
on the GPU where it trains, between messages.

The function runs with torch's random generator seeded from the run's ``seed``, the same on
every member, so that their models start from the same weights (what the soup of a short
run needs; seed it by ``partition-id`` inside the function for members that start apart).
The generator's state outside the function is left as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from wash_fed.clientapp import Task, WashMember
from wash_fed.config import MemberSettings
from wash_fed.keys import Record
from wash_fed.member import PopulationMember
from wash_fed.routing import member_app_with_worker, member_index
from wash_fed.training import INIT_STREAM, derive_seed
from wash_fed.worker_link import MemberSource

__all__ = ["MemberParts", "built_member", "handle_in_context", "wash_client_app"]

STATE_KEY = "wash-member"
"""The member's entry in ``context.state``: its settings and its state as bytes."""


@dataclass(frozen=True)
class MemberParts:
    """What a member is made of: ``model`` (on the device it trains on), the ``task`` that
    trains and evaluates it, and the ``optimizer`` whose per-parameter state WASH+Opt
    moves with the weights (``shuffle-optimizer-state``; None: the task keeps its own)."""

    model: nn.Module
    task: Task
    optimizer: torch.optim.Optimizer | None = None


def wash_client_app(build: Callable[[Context], MemberParts]) -> ClientApp:
    """A ClientApp whose member is built by ``build(context)``: at the run's hello, and
    again, its state taken up from ``context.state``, at every later message; or once, in
    the node's member worker, where the node has one (``build`` defined at a module's top
    level: a ValueError otherwise)."""

    def in_process(message_type: str, content: RecordDict, context: Context) -> RecordDict:
        started = time.perf_counter()
        member = built_member(build, message_type, content, context)
        return handle_in_context(member, message_type, content, context, started)

    return member_app_with_worker(lambda: MemberSource.of(build, "build"), in_process)


def handle_in_context(
    member: WashMember,
    message_type: str,
    content: RecordDict,
    context: Context,
    started: float,
    restore_own: Callable[[], None] | None = None,
) -> RecordDict:
    """Handle one message with ``member``, freshly built in this process: its state taken
    up from ``context.state`` (where it holds none, ``restore_own()`` may find some
    elsewhere), kept back there after the message. ``started``: when the process began on
    the message (``time.perf_counter()``), for ``restore-seconds``."""
    kept = context.state.config_records.get(STATE_KEY)
    if kept is not None:
        member.load_state_bytes(cast(bytes, kept["state"]))
    elif restore_own is not None:
        restore_own()
    member.startup_seconds = time.perf_counter() - started
    reply = member.handle(message_type, content)
    settings = json.dumps(member.member.settings.to_mapping())
    context.state[STATE_KEY] = ConfigRecord({"settings": settings, "state": member.state_bytes()})
    return reply


def built_member(
    build: Callable[[Context], MemberParts],
    message_type: str,
    content: RecordDict,
    context: Context,
) -> WashMember:
    """The node's member as ``build`` makes it, with the settings the server's hello gave
    (``content``, its first message's) or that ``context.state`` kept since."""
    kept = context.state.config_records.get(STATE_KEY)
    if kept is not None:
        settings = MemberSettings.from_mapping(json.loads(str(kept["settings"])))
    elif Record.SETTINGS in content.config_records:
        settings = MemberSettings.from_mapping(content.config_records[Record.SETTINGS])
    else:
        raise ValueError(
            f"a {message_type!r} message came before the server's hello: this node has no "
            "member of the run (was its SuperNode restarted without its state?)"
        )
    index = member_index(context.node_config, settings.num_members)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.seed, INIT_STREAM))
        parts = build(context)
    device = next(parts.model.parameters()).device
    member = PopulationMember(settings, index, parts.model, device, parts.optimizer)
    return WashMember(member, parts.task)
