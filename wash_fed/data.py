"""Data sets, their offline preparation, partitioning across members and resumable batch order.

Images are read once through torchvision's data set classes and kept as one uint8 tensor
(``(n, C, H, W)``) with int64 labels; batches are normalised on the fly. That keeps a batch a
single indexing operation on any device and makes a member's position in its data a pair of
integers that fits in Flower's ``context.state``.

Command line::

    python -m wash_fed.data prepare fashion-mnist [--root DIR]
    python -m wash_fed.data synthetic cifar10 --root DIR   # random images, for timing
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from wash_fed.files import save_torch

__all__ = [
    "DATASETS",
    "IMAGES",
    "BatchStream",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageData",
    "Partition",
    "channel_statistics",
    "default_root",
    "load_local",
    "load_split",
    "partition_indices",
    "prepare",
    "write_synthetic",
]

Partition = Literal["full", "iid", "dirichlet"]
PARTITIONS: tuple[str, ...] = get_args(Partition)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


IMAGES = "images"
"""The ``dataset`` of a task described by configuration (classes, channels, image size),
whose images come from files (``train-path``, ``test-path``, a node's ``data-path``)."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a run knows about its task: one of the supported data sets, or ``images``.

    An empty ``mean`` or ``std`` means: computed from the images being loaded."""

    name: str
    torchvision_class: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fix: str
    """The command that makes the data set available, quoted in errors."""


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "FashionMNIST",
        10,
        1,
        (28, 28),
        (0.2860,),
        (0.3530,),
        "make data   (or: python -m wash_fed.data prepare fashion-mnist)",
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        "CIFAR10",
        10,
        3,
        (32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "python -m wash_fed.data prepare cifar10   (needs internet, or unpack "
        "cifar-10-python.tar.gz into the data root)",
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "CIFAR100",
        100,
        3,
        (32, 32),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "python -m wash_fed.data prepare cifar100   (needs internet, or unpack "
        "cifar-100-python.tar.gz into the data root)",
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not on disk; the message names the command that fixes it."""


def default_root() -> Path:
    """``$WASH_FED_DATA`` if set, else ``~/.cache/wash-fed/data``: the same for every process."""
    env = os.environ.get("WASH_FED_DATA")
    return Path(env) if env else Path.home() / ".cache" / "wash-fed" / "data"


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}") from None


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held in memory.

    ``images``: uint8, shape ``(n, C, H, W)``. ``labels``: int64, shape ``(n,)``.
    """

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def to(self, device: torch.device | str) -> ImageData:
        """The same data on ``device`` (images stay uint8: 4x less memory than float)."""
        return ImageData(
            self.images.to(device), self.labels.to(device), self.mean, self.std, self.num_classes
        )

    def subset(self, indices: np.ndarray | Tensor) -> ImageData:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return ImageData(self.images[idx], self.labels[idx], self.mean, self.std, self.num_classes)

    def batch(self, indices: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """Normalised float images ``(b, C, H, W)`` and labels ``(b,)`` at ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        x = self.images[idx].float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std, self.labels[idx]

    def batches(self, batch_size: int, limit: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """Consecutive batches in stored order (for evaluation), at most ``limit`` of them."""
        starts = range(0, len(self), batch_size)
        if limit is not None:
            starts = starts[:limit]
        return [self.batch(torch.arange(s, min(s + batch_size, len(self)))) for s in starts]


def _torchvision_split(spec: DatasetSpec, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found ..."
        raise DatasetNotFoundError(
            f"{spec.name} is not under {root} ({err}). Fix: {spec.fix}"
        ) from None
    images = torch.as_tensor(np.asarray(ds.data))
    if images.dim() == 3:  # (n, H, W) grayscale
        images = images.unsqueeze(1)
    elif images.shape[-1] == spec.channels:  # (n, H, W, C) as CIFAR stores it
        images = images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


def _cache_path(spec: DatasetSpec, root: Path, train: bool) -> Path:
    return root / "wash-fed-tensors" / f"{spec.name}-{'train' if train else 'test'}.pt"


def load_split(name: str, root: Path | str | None = None, *, train: bool) -> ImageData:
    """Load the training or test split of data set ``name`` from ``root``.

    Reads the tensor file :func:`prepare` writes (one ``torch.load``, no image decoding and no
    torchvision import: it matters when every Flower message starts a fresh process), else
    the original files through torchvision. Raises :class:`DatasetNotFoundError` naming the
    fixing command when neither is on disk; nothing is downloaded here.
    """
    spec = _spec(name)
    root = Path(root) if root else default_root()
    cache = _cache_path(spec, root, train)
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        images, labels = saved["images"], saved["labels"]
    else:
        images, labels = _torchvision_split(spec, root, train)
    return ImageData(images, labels, spec.mean, spec.std, spec.num_classes)


def prepare(name: str, root: Path | str | None = None) -> str:
    """Make data set ``name`` available under ``root`` and say where it came from.

    Fashion-MNIST is taken, in order, from an earlier preparation, from Debian's
    ``dataset-fashion-mnist`` package files, or downloaded by torchvision. CIFAR comes from
    an earlier preparation or a torchvision download. Both splits are then decoded once into
    a tensor file that :func:`load_split` reads.
    """
    spec = _spec(name)
    root = Path(root) if root else default_root()
    source = _fetch(spec, root)
    for train in (True, False):
        images, labels = _torchvision_split(spec, root, train)
        cache = _cache_path(spec, root, train)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_torch(cache, {"images": images, "labels": labels})
    return f"{name}: {source}; decoded into {cache.parent}"


def _fetch(spec: DatasetSpec, root: Path) -> str:
    """Put the original files under ``root``; say where they came from."""
    try:
        _torchvision_split(spec, root, train=True)
        _torchvision_split(spec, root, train=False)
        return f"already under {root}"
    except DatasetNotFoundError:
        pass
    if spec.name == "fashion-mnist" and all(
        (DEBIAN_FASHION_MNIST / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES
    ):
        raw = root / spec.torchvision_class / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in FASHION_MNIST_FILES:
            with gzip.open(DEBIAN_FASHION_MNIST / f"{f}.gz") as src, open(raw / f, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return f"unpacked Debian's files from {DEBIAN_FASHION_MNIST} into {raw}"
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    try:
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as err:  # no network, or a mirror refused: say what to do instead
        hint = " or `apt-get install dataset-fashion-mnist`" if spec.name == "fashion-mnist" else ""
        raise DatasetNotFoundError(
            f"could not download {spec.name} into {root} ({err}); bring the files yourself{hint}"
        ) from err
    return f"downloaded by torchvision into {root}"


def load_local(path: Path | str, spec: DatasetSpec) -> ImageData:
    """Labelled images from a file or folder, for the task ``spec``.

    ``path`` is either a tensor file as :func:`prepare` writes it (``{"images": uint8
    (n, C, H, W), "labels": int64 (n,)}``, saved with ``torch.save``) or an image folder with
    one sub-folder per class, named by its label (``0``, ``1``, ...), of PNG or JPEG files.
    The images must have the task's channels and size and the labels its classes; the
    task's normalisation applies (where it gives none: the images' own per-channel mean and
    standard deviation). Every problem is an error naming the path.
    """
    dataset = spec.name
    path = Path(path).expanduser()
    if path.is_dir():
        images, labels = _image_folder(path, spec)
    elif path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            images, labels = saved["images"], saved["labels"]
        except Exception as err:
            raise ValueError(
                f"{path}: not a tensor file of images and labels ({type(err).__name__}: {err})"
            ) from None
    else:
        raise DatasetNotFoundError(f"the node's data {path} does not exist")
    expected = (spec.channels, *spec.image_size)
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"{path}: images must be a uint8 tensor (n, C, H, W)")
    if tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{path}: images of shape {tuple(images.shape[1:])}; {dataset} needs {expected}"
        )
    if not isinstance(labels, Tensor) or labels.shape != (len(images),) or not len(images):
        raise ValueError(f"{path}: needs one label per image and at least one image")
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes:
        raise ValueError(f"{path}: labels must be in 0..{spec.num_classes - 1} for {dataset}")
    mean, std = (spec.mean, spec.std) if spec.mean and spec.std else channel_statistics(images)
    return ImageData(images.contiguous(), labels, mean, std, spec.num_classes)


def channel_statistics(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``images`` ``(n, C, H, W)``, on the
    [0, 1] scale (a channel that never varies gets 1, not 0)."""
    x = images.double().div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


def _image_folder(path: Path, spec: DatasetSpec) -> tuple[Tensor, Tensor]:
    """Decode an image folder (one sub-folder per class, named by its label) with Pillow."""
    from PIL import Image

    mode = "L" if spec.channels == 1 else "RGB"
    images, labels = [], []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        if not folder.name.isdigit():
            raise ValueError(f"{folder}: class folders must be named by their label (0, 1, ...)")
        for file in sorted(f for f in folder.iterdir() if f.is_file()):
            with Image.open(file) as image:
                pixels = np.asarray(image.convert(mode), dtype=np.uint8)
            images.append(torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).copy()))
            labels.append(int(folder.name))
    if not images:
        raise ValueError(f"{path}: no images in class folders named by their label")
    sizes = {tuple(i.shape) for i in images}
    if len(sizes) > 1:
        raise ValueError(f"{path}: images of different shapes {sorted(sizes)[:3]}")
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def write_synthetic(
    name: str, root: Path | str | None = None, *, train: int = 1600, test: int = 200
) -> Path:
    """Random images with random labels in data set ``name``'s shape, written as the tensor
    files :func:`prepare` writes, so that :func:`load_split` reads them as that data set.

    For timing and smoke tests on machines without the real data: there is nothing to
    learn in them. Returns the folder written.
    """
    spec = _spec(name)
    root = Path(root) if root else default_root()
    generator = torch.Generator().manual_seed(0)
    for is_train, n in ((True, train), (False, test)):
        shape = (n, spec.channels, *spec.image_size)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, spec.num_classes, (n,), generator=generator)
        cache = _cache_path(spec, root, is_train)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_torch(cache, {"images": images, "labels": labels})
    return _cache_path(spec, root, True).parent


def partition_indices(
    labels: Tensor, num_partitions: int, partition: Partition, *, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Indices (into ``labels``) of each member's training data.

    ``full``: every member gets every index (each reads them in its own order).
    ``iid``: equal random shares (flwr-datasets ``IidPartitioner``).
    ``dirichlet``: label proportions per member drawn from ``Dirichlet(alpha)``
    (flwr-datasets ``DirichletPartitioner``): smaller ``alpha``, more skew.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    n = int(labels.numel())
    if partition == "full":
        return [np.arange(n) for _ in range(num_partitions)]
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

    table = Dataset.from_dict({"index": np.arange(n), "label": labels.cpu().numpy()})
    if partition == "iid":
        # IidPartitioner shards in stored order; shuffle first so shares are random.
        table = table.shuffle(seed=seed)
        partitioner: Partitioner = IidPartitioner(num_partitions)
    elif partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha, min_partition_size=1, seed=seed
        )
    else:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    partitioner.dataset = table
    return [np.asarray(partitioner.load_partition(i)["index"]) for i in range(num_partitions)]


class BatchStream:
    """An endless, resumable sequence of mini-batches over ``indices``.

    Epoch ``e`` visits ``indices`` in a permutation derived from ``(seed, e)`` and drops the
    last incomplete batch; the position is ``(epoch, cursor)``, so a member stopped and
    restored elsewhere continues exactly where it was.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        if len(indices) < batch_size:
            raise ValueError(
                f"a member has {len(indices)} training examples, fewer than batch_size={batch_size}"
            )
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence((self.seed, epoch))))
        return self.indices[rng.permutation(len(self.indices))]

    def next(self) -> np.ndarray:
        """The indices of the next batch, shape ``(batch_size,)``."""
        if self.cursor + self.batch_size > len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    @property
    def epochs_done(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.cursor / (self.batches_per_epoch * self.batch_size)

    def position(self) -> tuple[int, int]:
        return self.epoch, self.cursor

    def seek(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._order = self._epoch_order(epoch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wash_fed.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="make a data set available offline")
    prep.add_argument("dataset", choices=sorted(DATASETS))
    prep.add_argument("--root", type=Path, default=None, help=f"default: {default_root()}")
    fake = sub.add_parser(
        "synthetic", help="write random images in a data set's shape (timing, smoke tests)"
    )
    fake.add_argument("dataset", choices=sorted(DATASETS))
    fake.add_argument("--root", type=Path, required=True)
    fake.add_argument("--train", type=int, default=1600)
    fake.add_argument("--test", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(prepare(args.dataset, args.root))
    else:
        folder = write_synthetic(args.dataset, args.root, train=args.train, test=args.test)
        print(f"{args.dataset}: random images written to {folder} (nothing to learn in them)")


if __name__ == "__main__":
    main()
