"""Images of a shape wash-fed does not ship: RGB, 24 x 40 pixels, 5 classes. Class ``c``
is a bright horizontal band at row ``4c + 2`` with a tint of its own, on noise; a member
learns it in a few dozen steps.

    python -m examples.custom_task.make_images OUT [--nodes 2] [--train 600] [--test 200]

writes ``OUT/train.pt`` and ``OUT/test.pt`` (all images, for a simulation or a server-side
test set) and ``OUT/node-<i>/train.pt``, ``OUT/node-<i>/test.pt`` (each node's own share),
as tensor files ``{"images": uint8 (n, 3, 24, 40), "labels": int64 (n,)}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CLASSES, CHANNELS, HEIGHT, WIDTH = 5, 3, 24, 40
TINTS = torch.tensor(
    [[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0], [1.0, 1.0, 0.2], [0.2, 1.0, 1.0]]
)


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled images drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    pixels = 0.35 * torch.rand(n, CHANNELS, HEIGHT, WIDTH, generator=generator)
    for i, c in enumerate(labels.tolist()):
        row = 4 * c + 2
        pixels[i, :, row : row + 3, :] += 0.6 * TINTS[c].view(CHANNELS, 1, 1)
    return (pixels.clamp(0, 1) * 255).to(torch.uint8), labels


def save(path: Path, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": data[0], "labels": data[1]}, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--train", type=int, default=600, help="training images per node")
    parser.add_argument("--test", type=int, default=200, help="test images per node")
    args = parser.parse_args(argv)
    shares = [(images(args.train, 2 * i), images(args.test, 2 * i + 1)) for i in range(args.nodes)]
    for i, (train, test) in enumerate(shares):
        save(args.out / f"node-{i}" / "train.pt", train)
        save(args.out / f"node-{i}" / "test.pt", test)
    for split, index in (("train", 0), ("test", 1)):
        save(
            args.out / f"{split}.pt",
            (torch.cat([s[index][0] for s in shares]), torch.cat([s[index][1] for s in shares])),
        )
    print(
        f"{args.nodes} nodes' images ({CHANNELS}x{HEIGHT}x{WIDTH}, {CLASSES} classes) in {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
