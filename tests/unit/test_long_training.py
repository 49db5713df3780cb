"""The long-training comparison, tiny: two variants for one epoch of 300 images, each
evaluated after its epoch, a table and a plot from the stored rows; unknown variants are
named."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.frontier import read_rows
from simulations.long_training import main

TINY = "train-subset=300 holdout-size=0 test-subset=100 num-members=2 batch-size=32"


@pytest.mark.slow
def test_two_tiny_variants_shuffle_every_step_and_are_tabled(tmp_path: Path) -> None:
    args = ["--variants", "wash-p0.01,ensemble", "--epochs", "1", "--set", TINY]
    assert main([*args, "--out", str(tmp_path)]) == 0
    rows = {r.point: r for r in read_rows(tmp_path / "runs.jsonl")}
    assert rows.keys() == {"wash-p0.01", "ensemble"}
    wash = rows["wash-p0.01"]
    assert wash.overrides == {"strategy": "wash", "shuffle-prob": 0.01}
    (epoch,) = wash.epochs
    assert epoch.round == 300 // 32  # one round per step: a shuffle after every step
    assert epoch.member_mean is not None and 0.0 < epoch.member_mean <= 1.0
    assert rows["ensemble"].megabytes("train") == 0 < wash.megabytes("train")
    table = (tmp_path / "long_training.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| ensemble", "| wash-p0.01"]
    assert (tmp_path / "long_training.png").stat().st_size > 0
    # Run again: both are stored, nothing trains.
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert len(read_rows(tmp_path / "runs.jsonl")) == 2


def test_unknown_variants_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--variants", "wash-p0.5", "--out", str(tmp_path)]) == 2
    assert "wash-p0.5" in capsys.readouterr().err
