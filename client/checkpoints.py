"""A member's checkpoints on node-local disk: what makes a member restart-safe and a run
resumable.

One folder per member and run (``<base>/run-<run id>``: the member worker's own folder, or
``<member-checkpoints>/member-<partition>/run-<run id>`` for a member without a worker).
After every round the member is written to ``member-r<round>.pt`` -- aside, flushed, then
renamed, so a file is whole or absent. The server says in each round's message the newest
round of its own checkpoint; the member keeps its checkpoints of that round and later, so a
resumed run always finds the round it resumes from, even when the server stopped saving
(after ``flwr stop``) while rounds went on.

A checkpoint holds the member (:meth:`wash_fed.clientapp.WashMember.state_dict`: model,
optimizer, newest delivery applied, its task's schedule and data position, the credential
the server issued it, :mod:`wash_fed.strategy.roster`), torch's RNG state, the partition id
and the run configuration it belongs to.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import TypedDict, cast

import torch
from torch import Tensor

from wash_fed.clientapp import WashMember, WashMemberState
from wash_fed.config import ConfigValue, WashFedConfig
from wash_fed.files import save_torch

__all__ = ["MemberCheckpoints", "SavedMember"]

_NAME = re.compile(r"member-r(\d+)\.pt")


class SavedMember(TypedDict):
    """A checkpoint file: the member, torch's RNG, whose it is and what it trained with."""

    partition: int
    config: dict[str, ConfigValue]
    member: WashMemberState
    rng: Tensor


class MemberCheckpoints:
    """The checkpoints of one member in one run, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def of_run(cls, base: Path, run_id: int) -> MemberCheckpoints:
        return cls(base / f"run-{run_id}")

    def sibling(self, run_id: int) -> MemberCheckpoints:
        """The same member's checkpoints in another run (the one a run resumes)."""
        return MemberCheckpoints.of_run(self.directory.parent, run_id)

    def rounds(self) -> list[int]:
        """The rounds checkpointed, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(
        self, member: WashMember, cfg: WashFedConfig, server_round: int, keep_from: int | None
    ) -> None:
        """Write ``member`` as of ``server_round``; keep the checkpoints of rounds
        ``keep_from`` and later (None: this one only)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / f"member-r{server_round}.pt"
        saved = SavedMember(
            partition=member.member.index,
            config=cfg.to_mapping(),
            member=member.state_dict(),
            rng=torch.get_rng_state(),
        )
        save_torch(path, saved, mode=0o600)
        oldest = server_round if keep_from is None else min(keep_from, server_round)
        for old in self.rounds():
            if old < oldest:
                (self.directory / f"member-r{old}.pt").unlink(missing_ok=True)

    def restore(
        self, member: WashMember, cfg: WashFedConfig, at_most: int | None = None
    ) -> int | None:
        """Load the newest checkpoint (of a round ``<= at_most``, when given) into
        ``member``; its round, or None when there is none. Raises ValueError when the
        checkpoint is another member's or of another training configuration."""
        rounds = [r for r in self.rounds() if at_most is None or r <= at_most]
        if not rounds:
            return None
        path = self.directory / f"member-r{rounds[-1]}.pt"
        index = member.member.index
        loaded = torch.load(path, map_location=member.member.device, weights_only=False)
        saved = cast(SavedMember, loaded)  # written by save(), whole (files.save_torch)
        saved_cfg = WashFedConfig.from_mapping(saved["config"])
        changed = cfg.training_changes(saved_cfg)
        if saved["partition"] != index or changed:
            raise ValueError(
                f"the checkpoint {path} is of member {saved['partition']}"
                + (f", trained with other {', '.join(changed)}" if changed else "")
                + f"; this is member {index}. Remove it to start this member afresh"
            )
        member.load_state_dict(saved["member"])
        torch.set_rng_state(saved["rng"])
        return rounds[-1]

    def remove(self) -> None:
        """Delete the checkpoints (and the folder, when nothing else is in it)."""
        for saved in self.rounds():
            (self.directory / f"member-r{saved}.pt").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()
