"""WASH in Flower apps of the user's own (examples/): each runs through `flwr run` in a
simulation, the sequence app also in a local deployment (SuperLink and SuperNodes on
loopback, each member in its node's member worker), and a task function that raises ends
the run `failed`, naming it and the member.

Each app saves the model it hands over; the test scores that file itself, on the app's own
test data, and reads the members' accuracy from the strategy's final log line."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deploy.flwr_cli import PROJECT, FlwrRun
from deploy.processes import FlowerHarness
from wash_fed.ledger import Ledger
from wash_fed.results import read_results

pytestmark = pytest.mark.slow

EXAMPLES = PROJECT / "examples"
MEMBERS = 3
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"
FINAL_LINE = re.compile(r"test accuracy: members ([0-9.]+) \(min ([0-9.]+)\)")
"""The strategy's final log line (wash_fed.strategy.final): the members' mean and least
test accuracy."""


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerHarness]:
    with FlowerHarness(tmp_path_factory.mktemp("flwr-home")) as harness:
        harness.start_superlink(simulation=True)
        yield harness


def completed(run: FlwrRun) -> tuple[float, float]:
    """The members' mean and least accuracy of a completed run."""
    assert run.status == "finished:completed", f"{run.details}\n{run.output[-4000:]}"
    found = FINAL_LINE.search(run.output)
    assert found is not None, run.output[-3000:]
    return float(found[1]), float(found[2])


def quickstart_soup_accuracy(path: Path) -> float:
    """The saved quickstart model's accuracy on the whole Fashion-MNIST test set."""
    from examples.quickstart.quickstart.task import Net, load_data, test

    model = Net()
    model.load_state_dict(torch.load(path, weights_only=True))
    _, testloader = load_data(0, 1, examples=1)
    return test(model, testloader, torch.device("cpu"))[1]


def sequence_soup_accuracy(path: Path) -> float:
    """The saved GRU's accuracy on the sequence app's own server-side test strings."""
    from examples.sequence.sequence.app import TEST_SEED
    from examples.sequence.sequence.task import DigitSumGRU, accuracy, digits

    model = DigitSumGRU()
    model.load_state_dict(torch.load(path, weights_only=True))
    return accuracy(model, *digits(2000, TEST_SEED))


def test_the_quickstart_turned_to_wash_runs_through_flwr_run(
    simulation: FlowerHarness, tmp_path: Path
) -> None:
    """Fashion-MNIST has 10 classes: chance is 0.1; 3 rounds of 2,000 images each take a
    LeNet past 0.3, members and soup (they reach about 0.6)."""
    saved = tmp_path / "soup.pt"
    config = (
        f"num-members={MEMBERS} num-server-rounds=3 examples-per-member=2000 final-model='{saved}'"
    )
    run = simulation.run(config, app=EXAMPLES / "quickstart", federation_config=FEDERATION)
    members, least = completed(run)
    assert least > 0.3 and members > 0.3, run.output[-2000:]
    assert quickstart_soup_accuracy(saved) > 0.3


def test_a_gru_with_adamw_runs_through_flwr_run(simulation: FlowerHarness, tmp_path: Path) -> None:
    """Two classes of equal size: chance is 0.5; four rounds of 25 AdamW steps take the GRUs
    and their soup past 0.75 (they reach about 0.94). The run's folder holds every round and
    every message."""
    saved, runs = tmp_path / "soup.pt", tmp_path / "runs"
    config = f"num-members={MEMBERS} num-server-rounds=4 final-model='{saved}' output-dir='{runs}'"
    run = simulation.run(config, app=EXAMPLES / "sequence", federation_config=FEDERATION)
    members, least = completed(run)
    assert least > 0.75 and members > 0.75, run.output[-2000:]
    assert sequence_soup_accuracy(saved) > 0.75
    assert "[wash+opt] test accuracy" in run.output  # AdamW's moments moved with the weights
    (folder,) = runs.glob(f"*-wash+opt-{run.run_id}")
    results = read_results(folder)
    assert results.status == "completed" and len(results.rounds) == 4
    assert results.final is not None and results.final.final_accuracy > 0.75
    sent = Ledger.read_csv(folder / "ledger.csv")
    rounds = sent.by_round()  # the last round's replies (ledger phase collect) among them
    assert [rounds[row.round]["up"] for row in results.rounds] == [
        row.bytes_up for row in results.rounds
    ]
    assert sent.total("up", "collect") > 0, "the last round's replies carry the models"
    assert sent.total("down", "collect") == 0, "no collect message round"


def test_a_task_that_raises_fails_the_run_naming_it_and_the_member(
    simulation: FlowerHarness, tmp_path: Path
) -> None:
    app = shutil.copytree(EXAMPLES / "sequence", tmp_path / "sequence")
    task = app / "sequence" / "app.py"
    source = task.read_text()
    raising = source.replace(
        "        seed = 1_000 * self.member",
        '        raise ValueError("no data today")\n        seed = 1_000 * self.member',
    )
    assert raising != source
    task.write_text(raising)
    runs = tmp_path / "runs"
    run = simulation.run(
        f"num-members={MEMBERS} num-server-rounds=2 output-dir='{runs}'",
        app=app,
        federation_config=FEDERATION,
    )
    assert run.status == "finished:failed", run.output[-3000:]
    for member in range(MEMBERS):
        said = f"member {member}: DigitSumTask.train raised ValueError: no data today"
        assert said in run.output, run.output[-3000:]
    results = read_results(next(runs.glob(f"*-{run.run_id}")))
    assert results.status == "failed" and results.error is not None
    assert "DigitSumTask.train raised ValueError" in results.error


def test_the_sequence_app_runs_in_a_local_deployment_with_member_workers(
    tmp_path: Path, short_tmp: Path
) -> None:
    """SuperNodes on loopback, each member kept by its node's member worker (which imports
    the app's ``member`` function by name) from the hello to the end of the run."""
    saved, workers = tmp_path / "soup.pt", short_tmp  # a socket's path: 107 characters at most
    with FlowerHarness(tmp_path / "home") as harness:
        harness.start_superlink(simulation=False)
        harness.start_supernodes(MEMBERS, worker_dir=workers)
        run = harness.run(
            f"num-members={MEMBERS} num-server-rounds=3 final-model='{saved}'",
            app=EXAMPLES / "sequence",
        )
    members, least = completed(run)
    assert least > 0.75 and members > 0.75, run.output[-2000:]
    assert sequence_soup_accuracy(saved) > 0.75
    for member in range(MEMBERS):
        (log,) = (workers / f"member-{member}").glob("run-*/worker.log")
        said = log.read_text()
        assert said.count(f"member {member} ready on cpu") == 1, said  # built once
        assert "query.end: handled" in said and "stopped: the run ended" in said, said
