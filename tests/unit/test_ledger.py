"""The byte ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from wash_fed.ledger import Ledger


def test_totals_by_direction_phase_and_round(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.record(1, 0, "up", "train", 100)
    ledger.record(1, 1, "down", "train", 40)
    ledger.record(2, 0, "up", "train", 7)
    ledger.record(3, 0, "up", "collect", 1000)
    assert ledger.total() == 1147
    assert ledger.total("up") == 1107
    assert ledger.total("up", "train") == 107
    assert ledger.total("up", "train", round=2) == 7 and ledger.total(round=1) == 140
    assert ledger.by_round() == {
        1: {"up": 100, "down": 40},
        2: {"up": 7, "down": 0},
        3: {"up": 1000, "down": 0},
    }
    assert ledger.summary()["down.train"] == 40
    ledger.write_csv(tmp_path / "ledger.csv")
    again = Ledger.read_csv(tmp_path / "ledger.csv")
    assert again.entries == ledger.entries


def test_bad_entries_are_rejected() -> None:
    with pytest.raises(ValueError, match="direction"):
        Ledger().record(1, 0, "sideways", "train", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bytes"):
        Ledger().record(1, 0, "up", "train", -1)
