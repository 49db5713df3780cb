"""What a run produces, through ``results.json``: every type round-trips, a file that is not
a run's results is named with what in it is wrong, and the ServerApp's run output records
rounds, its end and a stop as the file says them."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from server.checkpoint import ServerCheckpoint
from wash_fed.config import WashFedConfig
from wash_fed.gate import Quarantine
from wash_fed.ledger import Ledger
from wash_fed.results import (
    EpochResult,
    ExchangeResult,
    FinalResult,
    ResultsError,
    ResumedFrom,
    RoundResult,
    RunResult,
    read_results,
    write_results,
)
from wash_fed.strategy.report import RunOutput
from wash_fed.strategy.state import StrategyState
from wash_fed.timing import RoundTime

CONFIG = WashFedConfig.from_mapping({"num-members": 3, "num-server-rounds": 2, "seed": 7})


def a_round(number: int, **changes: object) -> RoundResult:
    row = RoundResult(
        round=number,
        seconds=1.5,
        bytes_up=100 * number,
        bytes_down=90 * number,
        bytes_total=190 * number,
        members={"0": {"loss": 0.5, "partition-id": 0}, "2": {"loss": 0.25}},
        loss=0.375,
        train_accuracy=0.8,
        failed={"1": "no reply before the timeout"},
        rejected={},
        exchange={"selected": 12, "moved": 8, "participants": 2},
        exchange_digest="ab12",
        time=RoundTime(compute=1.1, slot=0.2, delivery=0.1, transfer=0.0, server=0.1),
        elapsed=1.5 * number,
    )
    return dataclasses.replace(row, **changes)  # type: ignore[arg-type]


def test_a_run_round_trips_through_results_json(tmp_path: Path) -> None:
    run = RunResult(
        "flower",
        "wash",
        CONFIG,
        status="completed",
        rounds=[a_round(1), a_round(2, test_accuracy=0.7)],
        exchanges=[ExchangeResult("bn", 3, 2.0, 40, 4000, RoundTime(0.5, 0.0, 1.5, 0.0, 0.0))],
        epochs=[EpochResult(1.0, 2, math.nan, 0.5, 380, 3.0, member_mean=0.6, soup=0.65)],
        final=FinalResult(
            final_accuracy=0.71,
            final_model="uniform+bn",
            members=[0.6, 0.7],
            ensemble=0.72,
            soups={"uniform": 0.5, "uniform+bn": 0.71},
            collected=[0, 2],
            quarantined=[1],
            rejected={"1": "collect: 'w' holds non-finite values"},
            bn_exchanges=1,
            members_own_evaluation={"0": 0.71},
        ),
        bytes={"up": 300, "down": 270, "total": 570, "up.train": 300, "down.train": 270},
        fedavg_bytes=10_000,
        run_id=42,
        members={"0": 101, "2": 103},
        resumed_from=ResumedFrom("runs/earlier", 41, 1),
    )
    path = tmp_path / "results.json"
    write_results(path, run)
    back = read_results(path)
    assert math.isnan(back.epochs[0].loss)  # a diverged run's NaN survives, as NaN
    back.epochs[0] = run.epochs[0]
    assert back == run
    assert back.config == CONFIG and back.strategy == "wash"
    assert back.sent() == 570 and back.sent("up", "train") == 300
    assert back.final_figures().member_mean == pytest.approx(0.65)
    assert back.mean_round_time() == RoundTime(1.1, 0.2, 0.1, 0.0, 0.1)
    on_disk = json.loads(path.read_text().replace("NaN", "null"))
    assert on_disk["config"]["num-members"] == 3  # the configuration's own kebab-case keys


def test_a_file_that_is_not_a_runs_results_is_named_with_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_results(path, RunResult("population", "wash", CONFIG))
    written = json.loads(path.read_text())
    for change, wrong in (
        ({"status": "finished"}, "status"),
        ({"rounds": [{"round": 1}]}, "rounds.0.seconds"),
        ({"config": {**written["config"], "shuffle-prob": 2.0}}, "shuffle-prob must be in"),
    ):
        path.write_text(json.dumps({**written, **change}))
        with pytest.raises(ResultsError, match=str(path)) as raised:
            read_results(path)
        assert wrong in str(raised.value)


def test_a_run_without_its_final_figures_says_how_it_ended() -> None:
    failed = RunResult("flower", "wash", CONFIG, status="failed", error="OSError: disk full")
    with pytest.raises(ResultsError, match="no final figures \\(failed: OSError: disk full\\)"):
        failed.final_figures()


def test_the_run_output_records_rounds_its_end_and_nothing_after_a_stop(tmp_path: Path) -> None:
    cfg = WashFedConfig.from_mapping({**CONFIG.to_mapping(), "output-dir": str(tmp_path)})
    ledger = Ledger()
    output = RunOutput.open(cfg, 42, ledger)
    assert output.directory.parent == tmp_path and output.directory.name.endswith("-wash-42")
    assert read_results(output.directory).status == "running"

    ledger.record(1, 0, "up", "train", 100)
    output.add_round(a_round(1))
    written = read_results(output.directory)
    assert [r.round for r in written.rounds] == [1] and written.sent() == 100
    assert 0.0 < written.rounds[0].elapsed < 60.0  # measured here, not the row's own figure
    assert (output.directory / "ledger.csv").read_text().count("\n") == 2

    output.finish(FinalResult(0.9, "uniform+bn", members=[0.8, 0.85]), fedavg_bytes=5000)
    completed = read_results(output.directory)
    assert completed.status == "completed" and completed.fedavg_bytes == 5000
    assert completed.final_figures().final_accuracy == 0.9

    output.stop()  # Flower's exit handlers call it after every run: a completed run stays so
    assert read_results(output.directory).status == "completed"


def test_a_stopped_run_writes_nothing_more(tmp_path: Path) -> None:
    cfg = WashFedConfig.from_mapping({**CONFIG.to_mapping(), "output-dir": str(tmp_path)})
    output = RunOutput.open(cfg, 43, Ledger())
    output.add_round(a_round(1))
    output.stop()
    stopped = read_results(output.directory)
    assert stopped.status == "stopped"
    output.add_round(a_round(2))
    output.fail(RuntimeError("too late"))
    checkpoint = ServerCheckpoint(
        cfg.to_mapping(), 43, [], 2, StrategyState(Quarantine(3)), [], [], {}
    )
    assert not output.save_checkpoint(checkpoint)
    assert read_results(output.directory) == stopped
    assert not (output.directory / "checkpoint.pt").exists()


def test_a_failed_run_says_why(tmp_path: Path) -> None:
    cfg = WashFedConfig.from_mapping({**CONFIG.to_mapping(), "output-dir": str(tmp_path)})
    output = RunOutput.open(cfg, 44, Ledger())
    output.fail(FloatingPointError("the final model is not finite"))
    failed = read_results(output.directory)
    assert failed.status == "failed"
    assert failed.error == "FloatingPointError: the final model is not finite"
