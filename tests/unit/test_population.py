"""The single-process population trainer on real data: the WASH mechanism end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wash_fed.config import WashFedConfig
from wash_fed.population import main, run_population
from wash_fed.results import read_results
from wash_fed.training import load_test_data, load_training_data

# Three members from different initialisations, 200 SGD steps each on 6,000 Fashion-MNIST
# images, WASH shuffling after every step (the paper's setting) with p = 0.2 (linear schedule).
MECHANISM = {
    "train-subset": 6000,
    "holdout-size": 0,
    "test-subset": 2000,
    "num-members": 3,
    "num-server-rounds": 200,
    "local-steps": 1,
    "batch-size": 64,
    "shuffle-prob": 0.2,
    "init": "different",
}
TINY = {"train-subset": 1500, "holdout-size": 0, "test-subset": 500, "num-members": 3}


@pytest.mark.slow
def test_wash_soup_stays_with_its_members_where_independent_soup_collapses() -> None:
    base = WashFedConfig.from_mapping(MECHANISM)
    data, test = load_training_data(base), load_test_data(base)
    runs = {
        strategy: run_population(
            WashFedConfig.from_mapping({**MECHANISM, "strategy": strategy}),
            data=data,
            test=test,
            log=lambda _: None,
            progress_eval=False,
        ).results.final_figures()
        for strategy in ("ensemble", "wash")
    }
    independent, wash = runs["ensemble"], runs["wash"]
    assert independent.member_mean is not None and wash.member_mean is not None
    # Independent members are fine on their own, and their weight average is not.
    assert independent.member_mean > 0.75
    assert independent.soups["uniform+bn"] < 0.5
    # WASH's soup is as good as its members (within 3 points) and far above the collapse.
    assert wash.soups["uniform+bn"] > wash.member_mean - 0.03
    assert wash.soups["uniform+bn"] > independent.soups["uniform+bn"] + 0.25


@pytest.mark.slow
def test_cli_writes_results_ledger_and_a_loadable_final_model(tmp_path: Path) -> None:
    args = [
        "--train-subset",
        "1500",
        "--holdout-size",
        "300",
        "--test-subset",
        "500",
        "--num-members",
        "2",
        "--local-steps",
        "4",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--soup",
        "greedy",
        "--variants",
        "wash,papa,fedavg",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "comparison.md").read_text().count("\n") == 5  # header, rule, 3 rows
    results = read_results(run_dir / "wash")
    assert results.config.num_server_rounds == 5  # 1 epoch of 1200 images = 18 steps / 4
    assert set(results.final_figures().soups) == {"uniform", "uniform+bn", "greedy", "greedy+bn"}
    ledger_rows = (run_dir / "wash" / "ledger.csv").read_text().splitlines()
    assert ledger_rows[0] == "round,member,direction,phase,bytes"
    train_bytes = sum(int(r.split(",")[4]) for r in ledger_rows[1:] if ",train," in r)
    assert train_bytes == results.sent(phase="train") > 0
    saved = torch.load(run_dir / "wash" / "final_model.pt")
    assert saved["model"] == "cnn" and "features.0.weight" in saved["state_dict"]


def test_cli_reports_bad_input_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--shuffle-prob", "2"]) == 2
    assert "shuffle-prob must be in [0.0, 1.0]" in capsys.readouterr().err
    assert main(["--variants", "wash,fedsgd"]) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_fedavg_starts_from_one_model_and_ends_with_the_members_average() -> None:
    """FedAvg on the member protocol: one initial model to every member, every round their
    full states up and the average down; the final model is the last average, and the
    ledger holds exactly 2 x rounds x members states."""
    cfg = WashFedConfig.from_mapping(
        {
            **TINY,
            "strategy": "fedavg",
            "num-server-rounds": 3,
            "local-steps": 4,
            "wire-dtype": "float32",
        }
    )
    run = run_population(cfg, log=lambda _: None, progress_eval=False)
    state_bytes = run.results.model_bytes
    assert run.ledger.total("down") == run.ledger.total("up") == 3 * 3 * state_bytes
    assert run.results.sent() == run.results.fedavg_bytes
    members = run.member_state_dicts  # after their last local steps, before the average
    for name, value in run.final_state_dict.items():
        if value.is_floating_point():
            mean = torch.stack([m[name].double() for m in members]).mean(0).to(value.dtype)
            assert torch.equal(value, mean), name
    assert 0.1 < run.results.final_figures().final_accuracy <= 1.0


@pytest.mark.slow
def test_fewer_bits_cut_what_wash_sends_as_counted_and_it_still_trains() -> None:
    """16-bit values halve WASH's bytes while training; 8 and 4 bits cut them to about a
    quarter and an eighth (a float32 scale per 64 values on top), and every run trains."""
    runs = {
        dtype: run_population(
            WashFedConfig.from_mapping(
                {
                    **TINY,
                    "num-server-rounds": 4,
                    "local-steps": 5,
                    "shuffle-prob": 0.2,
                    "wire-dtype": dtype,
                }
            ),
            log=lambda _: None,
            progress_eval=False,
        ).results
        for dtype in ("float32", "bfloat16", "int8", "int4")
    }
    sent = {d: r.sent(phase="train") for d, r in runs.items()}
    assert 2 * sent["bfloat16"] == sent["float32"] > 0
    assert 0.25 < sent["int8"] / sent["float32"] < 0.27, sent
    assert 0.125 < sent["int4"] / sent["float32"] < 0.145, sent
    accuracy = {d: r.final_figures().final_accuracy for d, r in runs.items()}
    for dtype in ("bfloat16", "int8", "int4"):
        assert accuracy[dtype] > 0.3, accuracy  # ten classes: chance is 0.1
        assert abs(accuracy[dtype] - accuracy["float32"]) < 0.1, accuracy
