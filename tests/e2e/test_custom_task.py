"""The example of docs/custom-models.md end to end: a model of the user's own
(examples/custom_task/tinynet.py, by import path) on a task of a shape the project does not
ship (RGB 24 x 40, 5 classes, examples/custom_task/make_images.py), through a `flwr run`
simulation and through a local deployment whose members train in workers on their own
files while the server holds no data. A model that cannot be built, or that members build
otherwise than the server, fails the run before any training, naming why."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from deploy.app_copies import copy_app
from deploy.flwr_cli import PROJECT, FlwrRun
from deploy.processes import TINY_RUN, FlowerHarness
from examples.custom_task.make_images import main as make_images
from wash_fed.config import ConfigValue
from wash_fed.results import RunResult, read_results

pytestmark = pytest.mark.slow

MEMBERS = 3
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"
TASK: dict[str, ConfigValue] = {
    **TINY_RUN,
    "num-members": MEMBERS,
    "dataset": "images",
    "num-classes": 5,
    "channels": 3,
    "image-size": "24x40",
    "model": "examples.custom_task.tinynet:build",
    "local-steps": 15,
    "batch-size": 32,
    "holdout-size": 60,
    "train-subset": 0,
    "test-subset": 0,
}
CHANCE = 1 / 5


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    assert make_images([str(out), "--nodes", str(MEMBERS), "--train", "400", "--test", "100"]) == 0
    return out


def run(
    harness: FlowerHarness, out: Path, config: Mapping[str, ConfigValue], app: Path = PROJECT
) -> tuple[FlwrRun, RunResult]:
    """A simulation of ``app``: how Flower says it ended, and its results."""
    result = harness.run(
        {**TASK, "output-dir": str(out), **config}, federation_config=FEDERATION, app=app
    )
    (run_dir,) = out.glob(f"*-{result.run_id}")
    return result, read_results(run_dir)


def files(images: Path) -> dict[str, str]:
    """The shared training and test files a simulation's members and server read."""
    return {"train-path": str(images / "train.pt"), "test-path": str(images / "test.pt")}


def assert_learned(flower: FlwrRun, results: RunResult) -> None:
    final = results.final_figures()
    assert flower.completed and results.status == "completed"
    assert final.final_accuracy > CHANCE + 0.3, final
    assert min(final.members) > CHANCE + 0.3, final


def test_a_custom_model_on_a_custom_task_through_a_simulation(
    simulation_harness: FlowerHarness, images: Path, tmp_path: Path
) -> None:
    flower, results = run(simulation_harness, tmp_path, files(images))
    assert_learned(flower, results)
    assert results.config.model.name == "examples.custom_task.tinynet:build"


@pytest.mark.parametrize(
    ("model", "why"),
    [
        ("examples.custom_task.nowhere:build", "cannot import it (ModuleNotFoundError"),
        ("examples.custom_task.tinynet:TinyNet", "its factory raised TypeError"),
    ],
    ids=["wrong-path", "factory-raises"],
)
def test_a_model_that_cannot_be_built_fails_the_run_before_training(
    simulation_harness: FlowerHarness, images: Path, tmp_path: Path, model: str, why: str
) -> None:
    flower, results = run(simulation_harness, tmp_path, {**files(images), "model": model})
    assert flower.status == "finished:failed" and results.status == "failed"
    assert results.rounds == [] and why in results.error and model in results.error


def test_members_that_build_another_model_fail_the_pre_flight_check(
    simulation_harness: FlowerHarness, images: Path, tmp_path: Path
) -> None:
    app = copy_app(tmp_path / "app")
    shutil.copytree(PROJECT / "examples", app / "examples")
    shutil.copy(PROJECT / "tests" / "e2e" / "odd_models.py", app / "odd_models.py")
    config = {**files(images), "model": "odd_models:build"}
    flower, results = run(simulation_harness, tmp_path / "runs", config, app)
    assert flower.status == "finished:failed" and results.rounds == []
    assert "builds another model than the server: state entry 0 is " in results.error
    assert (
        "features.0.weight:(24, 3, 3, 3), the server's is features.0.weight:(16, 3, 3, 3)"
        in results.error
    )


def test_a_custom_task_in_a_deployment_on_node_local_files_with_a_server_holding_no_data(
    images: Path, tmp_path: Path, short_tmp: Path
) -> None:
    members = 2
    with FlowerHarness(tmp_path / "home") as harness:
        harness.start_superlink(simulation=False)
        for i in range(members):
            node = images / f"node-{i}"
            harness.start_supernode(
                i,
                members,
                worker_dir=short_tmp,
                extra_node_config={
                    "data-path": str(node / "train.pt"),
                    "test-data-path": str(node / "test.pt"),
                },
            )
        harness.wait_online(members)
        config = {
            **TASK,
            "num-members": members,
            "test-on-server": False,
            "output-dir": str(tmp_path / "runs"),
        }
        result = harness.run(config, timeout=900)
        assert result.status == "finished:completed", f"{result.details}\n{harness.describe()}"
    (run_dir,) = (tmp_path / "runs").glob(f"*-{result.run_id}")
    results = read_results(run_dir)
    assert_learned(result, results)
    assert results.final_figures().evaluated_on == "members"
    assert "member 0 on node" in result.output and ": 370 training examples" in result.output
