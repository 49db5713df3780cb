"""The single-process population trainer on real data: the WASH mechanism end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wash_fed.config import ConfigError, WashFedConfig
from wash_fed.population import main, run_population
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
        ).results["final"]
        for strategy in ("ensemble", "wash")
    }
    independent, wash = runs["ensemble"], runs["wash"]
    # Independent members are fine on their own, and their weight average is not.
    assert independent["member_mean"] > 0.75
    assert independent["soups"]["uniform+bn"] < 0.5
    # WASH's soup is as good as its members (within 3 points) and far above the collapse.
    assert wash["soups"]["uniform+bn"] > wash["member_mean"] - 0.03
    assert wash["soups"]["uniform+bn"] > independent["soups"]["uniform+bn"] + 0.25


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
        "wash,papa",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "comparison.md").read_text().count("\n") == 4  # header, rule, 2 rows
    results = json.loads((run_dir / "wash" / "results.json").read_text())
    assert results["config"]["num-server-rounds"] == 5  # 1 epoch of 1200 images = 18 steps / 4
    assert set(results["final"]["soups"]) == {"uniform", "uniform+bn", "greedy", "greedy+bn"}
    ledger_rows = (run_dir / "wash" / "ledger.csv").read_text().splitlines()
    assert ledger_rows[0] == "round,member,direction,phase,bytes"
    train_bytes = sum(int(r.split(",")[4]) for r in ledger_rows[1:] if ",train," in r)
    assert train_bytes == results["bytes"]["up.train"] + results["bytes"]["down.train"] > 0
    saved = torch.load(run_dir / "wash" / "final_model.pt")
    assert saved["model"] == "cnn" and "features.0.weight" in saved["state_dict"]


def test_cli_reports_bad_input_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--shuffle-prob", "2"]) == 2
    assert "shuffle-prob must be in [0.0, 1.0]" in capsys.readouterr().err
    assert main(["--variants", "wash,fedsgd"]) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_fedavg_points_to_flower() -> None:
    with pytest.raises(ConfigError, match="flwr run"):
        run_population(WashFedConfig(strategy="fedavg"))
