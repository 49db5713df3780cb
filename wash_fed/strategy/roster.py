"""Who the members are: the node of each partition id, the pre-flight check, re-admission.

The server knows a member by its partition id, never by the node id Flower gives its
SuperNode: a SuperNode that restarts comes back under a new node id. Every member answers a
``query.hello`` -- its partition id, its data, its model's layout and parameters, the digest
of its first shuffle mask -- before it trains (:meth:`Roster.connect`) and again when it comes
back (:meth:`Roster.readmit`). The hello carries the settings every member must share
(:class:`wash_fed.config.MemberSettings`), so a member needs nothing of the run beforehand.

A member's place is its own. Each hello carries a fresh secret; a member that holds no
credential for the run adopts it, keeps it with its checkpoints and shows it at every hello.
The server binds each partition id to the credential of the member that first held it, and
a node that later claims the partition must show that credential: the member itself,
restarted from its checkpoint, is re-admitted; any other node is refused. (Under SuperNode
authentication a node's id is its registered key's, and a restarted node keeps it.)
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.keys import Config, Info, MessageType, Metric, Record
from wash_fed.models import state_layout

__all__ = ["Hellos", "MemberInfo", "Roster"]

HELLO_TIMEOUT = 120.0
"""Seconds a returning node's hello is given, and the least the pre-flight hello is given
whatever ``round-timeout`` says: a hello is a member's first message of the run, so its worker
starts, imports torch and loads its data first (tens of seconds on a busy CPU)."""
END_TIMEOUT = 30.0
"""Seconds to wait for the members to acknowledge the end of the run."""


@dataclass(frozen=True)
class MemberInfo:
    """A member's answer to ``query.hello``."""

    partition: int
    node: int
    examples: int
    test_examples: int
    holdout_examples: int
    device: str
    torch: str
    mask_digest: str
    resumed: bool
    steps_done: int
    resumed_round: int
    """The round of the earlier run's checkpoint it continues from (0: none)."""
    credential: str
    layout: list[str]
    """Its model's state entries, ``name:shape`` each (:func:`wash_fed.models.model_layout`)."""
    parameters: list[str]
    """The names of its model's parameters, in registration order."""
    state_kinds: list[str]
    """The optimizer state its shuffles move (WASH+Opt)."""


def _member_info(reply: Message) -> MemberInfo:
    content = reply.content
    return MemberInfo(
        partition=int(wire.metric(content, Metric.PARTITION_ID)),
        node=reply.metadata.src_node_id,
        examples=int(wire.metric(content, Metric.NUM_EXAMPLES)),
        test_examples=int(wire.metric(content, Metric.TEST_EXAMPLES)),
        holdout_examples=int(wire.metric(content, Metric.HOLDOUT_EXAMPLES)),
        device=str(wire.config_value(content, Info.DEVICE, Record.INFO)),
        torch=str(wire.config_value(content, Info.TORCH, Record.INFO)),
        mask_digest=str(wire.config_value(content, Info.MASK_DIGEST, Record.INFO)),
        resumed=bool(wire.config_value(content, Info.RESUMED, Record.INFO)),
        steps_done=int(wire.metric(content, Metric.STEPS_DONE, default=0)),
        resumed_round=int(wire.metric(content, Metric.RESUMED_ROUND)),
        credential=str(wire.config_value(content, Info.CREDENTIAL, Record.INFO)),
        layout=list(json.loads(str(wire.config_value(content, Info.MODEL_LAYOUT, Record.INFO)))),
        parameters=list(json.loads(str(wire.config_value(content, Info.PARAMETERS, Record.INFO)))),
        state_kinds=list(
            json.loads(str(wire.config_value(content, Info.STATE_KINDS, Record.INFO)))
        ),
    )


@dataclass
class Hellos:
    """The answers to one pre-flight hello: the members that passed, the problems of those
    that failed (each named by its node), and the nodes that could not be reached (no
    answer, or the SuperLink's own error for the node)."""

    members: list[MemberInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unreachable: dict[int, str] = field(default_factory=dict)


def _first_difference(member: list[str], server: list[str]) -> str | None:
    """Where a member's model layout first departs from the server's (``None``: nowhere)."""
    for i, (mine, theirs) in enumerate(zip(member, server, strict=False)):
        if mine != theirs:
            return f"state entry {i} is {mine}, the server's is {theirs}"
    if len(member) != len(server):
        return f"{len(member)} state entries, the server's model has {len(server)}"
    return None


class Roster:
    """The node id of every member (partition id), as the run goes on.

    ``reference`` is the model's state dict as the server knows it: every member must build
    a model of its layout (names and shapes, in order). The members name the parameters
    among its entries (all the same ones); every member must derive the server's mask of
    shuffle event 1 over them. ``on_bind(node, partition)`` is called whenever a node is
    bound to a member (the ledger attributes its bytes from then on).
    """

    def __init__(
        self,
        cfg: WashFedConfig,
        reference: Mapping[str, Tensor],
        on_bind: Callable[[int, int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.reference = reference
        self.layout = state_layout(reference)
        self.on_bind = on_bind
        self.parameters: list[str] = []
        """The model's parameters, by name in registration order, as every member named
        them at the pre-flight check (what WASH's masks range over)."""
        self.state_kinds: list[str] = []
        """The optimizer state every member's shuffles move, as they named it."""
        self.nodes: dict[int, int] = {}
        """Partition id -> node id, of the members taking part."""
        self.credentials: dict[int, str] = {}
        """Partition id -> the credential of the member that first held it (a resumed run
        takes them from the server's checkpoint)."""
        self.quarantined: dict[int, int] = {}
        """Partition id -> node id of members the reply gate rejected too often: asked
        nothing more (but told when the run ends)."""
        self.info: dict[int, MemberInfo] = {}
        """What each member said at its latest hello, by partition id."""
        self.continues: tuple[int, int] | None = None
        """A resumed run: (the run whose member checkpoints it continues, its last round)."""
        self.told_end: set[int] = set()
        """Nodes already sent the end of the run (the final step's last message ends it for
        the members it evaluates with); :meth:`end` tells the others."""
        self._refused: set[int] = set()

    def quarantine(self, partition: int) -> None:
        """Take a member out of the run for good; a node claiming it is refused."""
        node = self.nodes.pop(partition)
        self._refused.add(node)
        self.quarantined[partition] = node

    def partition_of(self, node: int) -> int | None:
        return next((p for p, n in self.nodes.items() if n == node), None)

    def connect(self, grid: Grid) -> None:
        """Check every member before any training. Once ``num-members`` nodes are listed
        (or ``node-wait-timeout`` is over), each is asked its hello, and each that comes
        later, until every partition is held by a member that passed -- or, once the wait is
        over, at least ``min-members`` are (the others are taken in when they come:
        :meth:`readmit`). A node that cannot be reached is skipped with a warning (asked
        again if it comes back); a member that fails its check stops the run with its own
        words."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.runtime.node_wait_timeout
        passed: dict[int, MemberInfo] = {}
        asked: set[int] = set()
        said: list[int] = []
        while waiting := sorted(set(range(cfg.num_members)) - set(passed)):
            listed = set(grid.get_node_ids())
            asked &= listed  # a node gone from the list is asked again if it comes back
            over = time.monotonic() > deadline
            new = sorted(listed - asked)
            if new and (len(listed) >= cfg.num_members or over):  # at once, where they can
                asked |= set(new)
                self._admit_first(self._hello(grid, new, self._hello_timeout), passed)
                continue
            if over:
                self._start_without(waiting, passed)
                break
            if waiting != said:
                log(
                    INFO,
                    "waiting for members %s (%d of %d checked)",
                    waiting,
                    len(passed),
                    cfg.num_members,
                )
                said = waiting
            time.sleep(2.0)
        for member in sorted(passed.values(), key=lambda m: m.partition):
            self._bind(member)
            log(
                INFO,
                "member %d on node %d: %d training examples, %s%s",
                member.partition,
                member.node,
                member.examples,
                member.device,
                f"; continues from its round {member.resumed_round} checkpoint"
                if self.continues
                else "",
            )

    @property
    def _hello_timeout(self) -> float:
        return max(self.cfg.runtime.round_timeout, HELLO_TIMEOUT)

    @property
    def absent(self) -> set[int]:
        """Partition ids of members not taking part: never checked, or gone."""
        taking_part = set(self.nodes) | set(self.quarantined)
        return set(range(self.cfg.num_members)) - taking_part

    def _admit_first(self, hellos: Hellos, passed: dict[int, MemberInfo]) -> None:
        """Members of the pre-flight check into ``passed``; a RuntimeError naming every
        problem, a partition claimed twice, or a member without the credential its
        checkpoint carries (a continued run)."""
        if not self.parameters and hellos.members:  # the first members name the run's
            self.parameters, self.state_kinds = self._agreed(hellos.members)
        members, problems = self._same_masks(hellos.members, hellos.problems)
        for member in members:
            if (earlier := passed.get(member.partition)) is not None:
                nodes = f"{earlier.node} and {member.node}"
                problems.append(f"member {member.partition} is claimed by nodes {nodes}")
            elif self.credentials.get(member.partition, member.credential) != member.credential:
                problems.append(
                    f"member {member.partition} on node {member.node} lacks the credential its "
                    "checkpoints carry: the run continued holds another member there"
                )
            passed.setdefault(member.partition, member)
        if problems:
            raise RuntimeError("members failed their pre-flight check:\n  " + "\n  ".join(problems))
        for node, reason in hellos.unreachable.items():
            log(
                WARNING,
                "node %d could not be checked (%s); it is asked again if it comes back",
                node,
                reason,
            )

    def _start_without(self, waiting: list[int], passed: Mapping[int, MemberInfo]) -> None:
        """``node-wait-timeout`` is over with members ``waiting`` unchecked: start without
        them when ``min-members`` passed, else a TimeoutError naming them."""
        cfg = self.cfg
        needed = cfg.min_members or cfg.num_members
        if len(passed) < needed:
            raise TimeoutError(
                f"{len(passed)} of num-members={cfg.num_members} members passed the pre-flight "
                f"check within node-wait-timeout={cfg.runtime.node_wait_timeout:g} s, "
                f"min-members={needed}; members {waiting} never answered"
            )
        log(
            WARNING,
            "starting without members %s, taken in when they come (min-members=%d)",
            waiting,
            needed,
        )

    def readmit(self, grid: Grid, missing: Iterable[int]) -> list[int]:
        """Look for members in ``missing`` (partition ids) that came back under a new node
        id; re-admit those whose check passes. Returns the partition ids re-admitted."""
        missing = set(missing)
        if not missing:
            return []
        new = set(grid.get_node_ids()) - set(self.nodes.values()) - self._refused
        if not new:
            return []
        hellos = self._hello(grid, sorted(new), HELLO_TIMEOUT)
        members, problems = self._same_masks(hellos.members, hellos.problems)
        for problem in problems:
            log(WARNING, "a new node failed its check and is not asked again: %s", problem)
        self._refused |= new - {m.node for m in members} - set(hellos.unreachable)
        back = []
        for member in members:
            holder = self.nodes.get(member.partition)
            if member.partition not in missing:
                log(
                    WARNING,
                    "node %d claims member %d, which is not missing (node %s holds it); refused",
                    member.node,
                    member.partition,
                    holder,
                )
                self._refused.add(member.node)
                continue
            if self.credentials.get(member.partition, member.credential) != member.credential:
                log(
                    WARNING,
                    "node %d claims member %d, held by node %d, without the member's "
                    "credential; refused",
                    member.node,
                    member.partition,
                    holder,
                )
                self._refused.add(member.node)
                continue
            joins = member.partition not in self.credentials  # missed the pre-flight check
            self._bind(member)
            missing.discard(member.partition)
            back.append(member.partition)
            log(
                INFO,
                "member %d %s on node %d (%s at step %d)",
                member.partition,
                "joins" if joins else "is back",
                member.node,
                "restored from its checkpoint" if member.resumed else "started afresh",
                member.steps_done,
            )
        return back

    def _bind(self, member: MemberInfo) -> None:
        """``member``'s node holds its partition from now on."""
        self.nodes[member.partition] = member.node
        self.info[member.partition] = member
        self.credentials.setdefault(member.partition, member.credential)
        if self.on_bind is not None:
            self.on_bind(member.node, member.partition)

    @staticmethod
    def end_config(
        *, completed: bool, earlier_runs: Iterable[int] = ()
    ) -> dict[str, wire.ConfigValue]:
        """What a ``query.end`` message says: the members of a run that did not complete
        keep their checkpoints, for ``resume-from``; otherwise they remove them, and those
        of the ``earlier_runs`` it continued."""
        return {Config.KEEP_CHECKPOINTS: not completed, Config.EARLIER_RUNS: list(earlier_runs)}

    @contextlib.contextmanager
    def ending(self, grid: Grid, earlier_runs: Iterable[int] = ()) -> Iterator[None]:
        """On leaving the block, every member is told that the run ended: completed (their
        checkpoints go, with those of the ``earlier_runs`` it continued), or, when the block
        raised, not (they keep them, for ``resume-from``)."""
        try:
            yield
        except Exception:
            with contextlib.suppress(Exception):  # the block's error is the one to report
                self.end(grid, completed=False)
            raise
        self.end(grid, completed=True, earlier_runs=earlier_runs)

    def end(self, grid: Grid, *, completed: bool, earlier_runs: Iterable[int] = ()) -> None:
        """Tell every member not yet told that the run is over (their workers exit); waits
        briefly. See :meth:`end_config`."""
        nodes = [
            n for n in [*self.nodes.values(), *self.quarantined.values()] if n not in self.told_end
        ]
        if not nodes:
            return
        self.told_end.update(nodes)
        timeout = min(self.cfg.runtime.round_timeout, END_TIMEOUT)
        config = self.end_config(completed=completed, earlier_runs=earlier_runs)
        messages = [
            wire.message(n, MessageType.END, self.cfg.final_round, config, ttl=timeout)
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        told = sum(not r.has_error() for r in replies)
        if told < len(messages):
            log(WARNING, "%d of %d members acknowledged the end of the run", told, len(messages))

    def _hello(self, grid: Grid, nodes: list[int], timeout: float) -> Hellos:
        """Ask ``nodes`` who they are and check what they say."""
        config: dict[str, wire.ConfigValue] = {}
        if self.continues is not None:
            config = {Config.RESUME_RUN: self.continues[0], Config.RESUME_ROUND: self.continues[1]}
        messages = [
            wire.message(
                n,
                MessageType.HELLO,
                0,
                {**config, Config.CREDENTIAL: secrets.token_hex(16)},
                ttl=timeout,
            )
            for n in nodes
        ]
        settings = ConfigRecord(dict(self.cfg.member_settings.to_mapping()))
        for message in messages:
            message.content[Record.SETTINGS] = settings
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = {asked[r.metadata.reply_to_message_id] for r in replies}
        got = Hellos(
            unreachable={n: f"no answer within {timeout:g} s" for n in nodes if n not in answered}
        )
        for reply in replies:
            node = asked[reply.metadata.reply_to_message_id]
            if reply.has_error() and not wire.is_member_error(reply):
                got.unreachable[node] = wire.error_reason(reply)
            elif reply.has_error():
                got.problems.append(f"node {node}: {wire.error_reason(reply)}")
            else:
                self._check_hello(reply, node, got)
        return got

    def _check_hello(self, reply: Message, node: int, got: Hellos) -> None:
        """One hello reply into ``got``: a member whose model has the server's layout, or
        a problem."""
        try:
            member = _member_info(reply)
        except (KeyError, TypeError, ValueError) as err:
            got.problems.append(f"node {node}: malformed hello reply ({err!r})")
            return
        if (difference := _first_difference(member.layout, self.layout)) is not None:
            got.problems.append(
                f"member {member.partition} on node {node} builds another model than the "
                f"server: {difference}"
            )
            return
        got.members.append(member)

    def _agreed(self, members: list[MemberInfo]) -> tuple[list[str], list[str]]:
        """The parameters and the optimizer state every member named (a RuntimeError naming
        them where they differ, or name entries the model lacks)."""
        named = {(tuple(m.parameters), tuple(m.state_kinds)): m.partition for m in members}
        if len(named) > 1:
            raise RuntimeError(
                "members name different parameters or optimizer state: "
                + "; ".join(
                    f"member {p}: {list(names)[:4]}, {list(kinds)}"
                    for (names, kinds), p in named.items()
                )
            )
        parameters, state_kinds = (list(part) for part in next(iter(named), ((), ())))
        unknown = [name for name in parameters if name not in self.reference]
        if unknown:
            raise RuntimeError(f"members name parameters the model lacks: {unknown[:4]}")
        return parameters, state_kinds

    def _same_masks(
        self, members: list[MemberInfo], problems: list[str]
    ) -> tuple[list[MemberInfo], list[str]]:
        """The members that name the run's parameters and derive the server's first mask
        over them; the problems of the others added to ``problems``."""
        numels = [self.reference[name].numel() for name in self.parameters]
        digest = self.cfg.shuffle_mask(numels, 1).digest()
        passed = []
        for member in members:
            where = f"member {member.partition} on node {member.node}"
            if (member.parameters, member.state_kinds) != (self.parameters, self.state_kinds):
                problems.append(f"{where} names other parameters or optimizer state than the run's")
            elif member.mask_digest != digest:
                problems.append(
                    f"{where} derives other shuffle masks than the server ({member.mask_digest!r}"
                    f" != {digest!r}): install the same numpy and torch everywhere (it has "
                    f"torch {member.torch})"
                )
            else:
                passed.append(member)
        return passed, problems
