"""Data sets, offline preparation, partitions and resumable batch order (wash_fed.data)."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wash_fed.data import (
    BatchStream,
    DatasetNotFoundError,
    ImageData,
    load_split,
    partition_indices,
    prepare,
)


def test_fashion_mnist_is_real_and_complete(fashion_train: ImageData) -> None:
    test = load_split("fashion-mnist", train=False)
    assert fashion_train.images.shape == (60_000, 1, 28, 28)
    assert fashion_train.images.dtype == torch.uint8
    assert len(test) == 10_000
    assert torch.bincount(fashion_train.labels).tolist() == [6000] * 10
    x, y = fashion_train.batch(np.arange(512))
    assert torch.equal(y, fashion_train.labels[:512])
    assert x.shape == (512, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2  # normalised


def test_missing_data_set_names_the_fixing_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="make data"):
        load_split("fashion-mnist", tmp_path, train=True)
    with pytest.raises(DatasetNotFoundError, match="prepare cifar10"):
        load_split("cifar10", tmp_path, train=False)
    with pytest.raises(ValueError, match="unknown data set"):
        load_split("mnist-3d", tmp_path, train=True)


def test_prepare_unpacks_debian_files_and_is_idempotent(tmp_path: Path) -> None:
    first = prepare("fashion-mnist", tmp_path)
    assert "Debian" in first
    assert "already under" in prepare("fashion-mnist", tmp_path)
    assert len(load_split("fashion-mnist", tmp_path, train=False)) == 10_000


def test_decoded_tensor_file_holds_exactly_the_original_images(tmp_path: Path) -> None:
    prepare("fashion-mnist", tmp_path)
    cached = load_split("fashion-mnist", tmp_path, train=True)
    shutil.rmtree(tmp_path / "wash-fed-tensors")
    decoded = load_split("fashion-mnist", tmp_path, train=True)  # through torchvision
    assert torch.equal(cached.images, decoded.images)
    assert torch.equal(cached.labels, decoded.labels)


def _write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, classes: int) -> None:
    """A tiny data set in CIFAR's on-disk format (pickled batches), registered with torchvision."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if classes == 10 else tvd.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if classes == 10 else "fine_labels"
    rng = np.random.default_rng(0)
    entries = []
    for name, _ in cls.train_list + cls.test_list:
        n = 6
        batch = {
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        entries.append([name, hashlib.md5((folder / name).read_bytes()).hexdigest()])
    meta = {cls.meta["key"]: [f"class{i}" for i in range(classes)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta))
    # torchvision checks the official checksums; register those of the files written here.
    n_train = len(cls.train_list)
    monkeypatch.setattr(cls, "train_list", entries[:n_train])
    monkeypatch.setattr(cls, "test_list", entries[n_train:])
    monkeypatch.setitem(
        cls.meta, "md5", hashlib.md5((folder / cls.meta["filename"]).read_bytes()).hexdigest()
    )


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loading_from_its_on_disk_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, classes: int
) -> None:
    _write_cifar(tmp_path, monkeypatch, classes)
    train = load_split(name, tmp_path, train=True)
    test = load_split(name, tmp_path, train=False)
    n_train = 30 if classes == 10 else 6
    assert train.images.shape == (n_train, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 6 and train.num_classes == classes
    x, _ = train.batch(np.arange(4))
    assert x.shape == (4, 3, 32, 32)
    # Pixel layout: CIFAR stores (n, 3072) as CHW; torchvision gives HWC; we give CHW again.
    raw = pickle.loads(
        (
            tmp_path
            / ("cifar-10-batches-py/data_batch_1" if classes == 10 else "cifar-100-python/train")
        ).read_bytes()
    )
    assert torch.equal(train.images[0].reshape(-1), torch.from_numpy(raw["data"][0]))


def test_full_partition_gives_everyone_everything() -> None:
    labels = torch.arange(100) % 10
    parts = partition_indices(labels, 3, "full")
    assert all(np.array_equal(p, np.arange(100)) for p in parts)


def test_iid_partition_is_a_disjoint_cover_of_random_shares() -> None:
    labels = torch.arange(1000) % 10
    parts = partition_indices(labels, 4, "iid", seed=1)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1000))
    assert [len(p) for p in parts] == [250] * 4
    assert not np.array_equal(np.sort(parts[0]), np.arange(250))  # shuffled, not stored order
    again = partition_indices(labels, 4, "iid", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_partition_skews_labels_more_for_small_alpha() -> None:
    labels = torch.arange(6000) % 10

    def skew(alpha: float) -> float:
        parts = partition_indices(labels, 4, "dirichlet", alpha=alpha, seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(6000))
        hist = np.stack([np.bincount(labels[p].numpy(), minlength=10) / len(p) for p in parts])
        return float(np.abs(hist - 0.1).sum())

    assert skew(0.1) > 2 * skew(100.0)


def test_batch_stream_resumes_exactly() -> None:
    idx = np.arange(50)
    a = BatchStream(idx, 8, seed=3)
    seen = [a.next() for _ in range(9)]  # crosses an epoch (6 batches per epoch)
    assert a.batches_per_epoch == 6 and a.epoch == 1
    b = BatchStream(idx, 8, seed=3)
    for _ in range(4):
        b.next()
    c = BatchStream(idx, 8, seed=3)
    c.seek(*b.position())
    assert all(np.array_equal(x, c.next()) for x in seen[4:])
    first_epoch = np.concatenate(seen[:6])
    assert len(set(first_epoch.tolist())) == 48  # no repeats within an epoch
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchStream(np.arange(5), 8, seed=0)
