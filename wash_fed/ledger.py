"""The byte ledger: every payload a run sends, per round, per member, per direction.

One row per message: ``round`` (training rounds count from 1; the final phase's messages
carry the round after the last), ``member`` (partition id), ``direction`` (``up``: member to
server, ``down``: server to member), ``phase`` (what the message was for) and ``bytes``.
The Flower app records the size of what it actually serialized; the population trainer
records the size of the tensors that would travel. Both write the same CSV file and totals.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

from wash_fed.files import write_csv

__all__ = ["Direction", "Ledger", "LedgerEntry"]

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    member: int
    direction: Direction
    phase: str
    """``train`` (the rounds), ``collect`` (the final full weights: the last round's
    replies, and collect messages), ``bn`` (recalibration), ..."""
    bytes: int


class Ledger:
    """An append-only list of :class:`LedgerEntry` with the totals a report needs."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self.entries: list[LedgerEntry] = list(entries)

    def record(
        self, round: int, member: int, direction: Direction, phase: str, nbytes: int
    ) -> None:
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        if nbytes < 0:
            raise ValueError(f"a message cannot have {nbytes} bytes")
        self.entries.append(LedgerEntry(round, member, direction, phase, int(nbytes)))

    def attribute(self, indices: Iterable[int], member: int) -> None:
        """The entries at ``indices``, recorded before their member was known (-1), are
        ``member``'s."""
        for i in indices:
            self.entries[i] = replace(self.entries[i], member=member)

    def total(
        self, direction: Direction | None = None, phase: str | None = None, round: int | None = None
    ) -> int:
        """Bytes over all entries matching ``direction``, ``phase`` and ``round`` (``None``:
        any)."""
        return sum(
            e.bytes
            for e in self.entries
            if (direction is None or e.direction == direction)
            and (phase is None or e.phase == phase)
            and (round is None or e.round == round)
        )

    def by_round(self) -> dict[int, dict[str, int]]:
        """``{round: {"up": bytes, "down": bytes}}`` in round order."""
        rounds: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        for e in self.entries:
            rounds[e.round][e.direction] += e.bytes
        return dict(sorted(rounds.items()))

    def summary(self) -> dict[str, int]:
        """Totals by direction and by ``direction.phase``: ``{"up": .., "up.train": .., ...}``."""
        out = {"up": self.total("up"), "down": self.total("down"), "total": self.total()}
        for phase in sorted({e.phase for e in self.entries}):
            out[f"up.{phase}"] = self.total("up", phase)
            out[f"down.{phase}"] = self.total("down", phase)
        return out

    def write_csv(self, path: Path | str) -> None:
        """Every entry as a row of ``path`` (written atomically)."""
        fieldnames = [fl.name for fl in fields(LedgerEntry)]
        write_csv(Path(path), fieldnames, (asdict(e) for e in self.entries))

    @classmethod
    def read_csv(cls, path: Path | str) -> Ledger:
        with open(path, newline="") as f:
            return cls(
                LedgerEntry(
                    int(row["round"]),
                    int(row["member"]),
                    row["direction"],  # type: ignore[arg-type]
                    row["phase"],
                    int(row["bytes"]),
                )
                for row in csv.DictReader(f)
            )
