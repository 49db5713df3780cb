"""Node-local data: a SuperNode trains on its own files (a tensor file or an image folder),
and a server with no data at all runs WASH to the end, picking greedy-soup ingredients on
the members' held-out images and evaluating on the members' own test data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from deploy.processes import TINY_RUN, FlowerHarness
from wash_fed.config import ConfigValue, WashFedConfig
from wash_fed.data import DATASETS, DatasetNotFoundError, ImageData, load_local, load_split
from wash_fed.results import read_results
from wash_fed.training import local_member_data


def save_tensor_file(path: Path, data: ImageData) -> Path:
    torch.save({"images": data.images, "labels": data.labels}, path)
    return path


def save_image_folder(path: Path, data: ImageData) -> Path:
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = path / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")
    return path


def first(data: ImageData, start: int, stop: int) -> ImageData:
    return data.subset(torch.arange(start, stop))


def test_a_tensor_file_and_an_image_folder_hold_the_same_images(
    tmp_path: Path, fashion_train: ImageData
) -> None:
    part = first(fashion_train, 0, 60)
    from_file = load_local(save_tensor_file(tmp_path / "part.pt", part), DATASETS["fashion-mnist"])
    from_folder = load_local(
        save_image_folder(tmp_path / "folder", part), DATASETS["fashion-mnist"]
    )
    order = torch.argsort(part.labels, stable=True)  # the folder is read class by class
    assert torch.equal(from_file.images, part.images)
    assert torch.equal(from_folder.images, part.images[order])
    assert torch.equal(from_folder.labels, part.labels[order])
    assert from_file.mean == fashion_train.mean and from_file.num_classes == 10


def test_bad_node_data_is_named_with_its_path(tmp_path: Path, fashion_train: ImageData) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_local(tmp_path / "missing.pt", DATASETS["fashion-mnist"])
    part = save_tensor_file(tmp_path / "part.pt", first(fashion_train, 0, 10))
    with pytest.raises(ValueError, match=r"shape \(1, 28, 28\); cifar10 needs \(3, 32, 32\)"):
        load_local(part, DATASETS["cifar10"])
    bad = ImageData(
        fashion_train.images[:4], torch.tensor([0, 1, 2, 10]), (0.0,), (1.0,), num_classes=10
    )
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        load_local(save_tensor_file(tmp_path / "bad.pt", bad), DATASETS["fashion-mnist"])
    (tmp_path / "folder" / "shirts").mkdir(parents=True)
    with pytest.raises(ValueError, match="named by their label"):
        load_local(tmp_path / "folder", DATASETS["fashion-mnist"])


def test_a_member_holds_out_its_share_of_its_own_data(
    tmp_path: Path, fashion_train: ImageData
) -> None:
    path = save_tensor_file(tmp_path / "own.pt", first(fashion_train, 0, 500))
    cfg = WashFedConfig.from_mapping({"num-members": 4, "holdout-size": 200, "batch-size": 32})
    data = local_member_data(cfg, 1, str(path), None)
    assert data.holdout is not None and len(data.holdout) == 50 and len(data.train) == 450
    assert data.test is None
    rows = {bytes(image.numpy()) for image in data.train.images}
    assert not any(bytes(image.numpy()) in rows for image in data.holdout.images)


@pytest.fixture
def node_files(tmp_path: Path, fashion_train: ImageData) -> dict[str, Path]:
    test = load_split("fashion-mnist", train=False)
    return {
        "train-0": save_tensor_file(tmp_path / "train-0.pt", first(fashion_train, 0, 1500)),
        "train-1": save_image_folder(tmp_path / "train-1", first(fashion_train, 1500, 2100)),
        "test-0": save_tensor_file(tmp_path / "test-0.pt", first(test, 0, 300)),
        "test-1": save_tensor_file(tmp_path / "test-1.pt", first(test, 300, 500)),
    }


@pytest.mark.slow
def test_two_nodes_train_on_their_own_files_and_the_server_needs_no_data(
    tmp_path: Path, short_tmp: Path, node_files: dict[str, Path]
) -> None:
    workers = short_tmp  # a Unix socket's path is short
    empty = tmp_path / "no-data"  # the run's data root holds nothing: neither side may need it
    empty.mkdir()
    with FlowerHarness(tmp_path / "home") as harness:
        harness.start_superlink(simulation=False)
        for i in range(2):
            harness.start_supernode(
                i,
                2,
                worker_dir=workers,
                extra_node_config={
                    "data-path": str(node_files[f"train-{i}"]),
                    "test-data-path": str(node_files[f"test-{i}"]),
                },
            )
        harness.wait_online(2)
        config: dict[str, ConfigValue] = {
            **TINY_RUN,
            "num-members": 2,
            "num-server-rounds": 2,
            "data-root": str(empty),
            "test-on-server": False,
            "soup": "greedy",
            "holdout-size": 200,
            "eval-every": 1,
            "output-dir": str(tmp_path / "runs"),
        }
        result = harness.run(config, timeout=900)
        assert result.status == "finished:completed", f"{result.details}\n{harness.describe()}"
    (run_dir,) = (tmp_path / "runs").glob(f"*-{result.run_id}")
    results = read_results(run_dir)
    assert "member 0 on node" in result.output and ": 1400 training examples" in result.output
    assert ": 500 training examples" in result.output  # 600 images, 100 of them held out
    final = results.final_figures()
    assert final.evaluated_on == "members" and final.ensemble is None
    assert {"greedy", "greedy+bn"} <= set(final.soups) and final.final_model == "greedy+bn"
    assert set(final.members_own_evaluation) == {"0", "1"}
    assert all(0.0 < a <= 1.0 for a in final.members) and len(final.members) == 2
    assert all(r.test_accuracy is not None for r in results.rounds)
