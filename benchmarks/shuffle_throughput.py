"""Shuffle throughput for a ResNet-18-sized population against a plain memory copy.

For each shuffle probability, one WASH shuffle event over N members (mask derivation, gather,
per-coordinate permutation, scatter) is timed, next to copying every member's parameters once
(``dst.copy_(src)``, the floor for touching that much memory). Printed side by side:

* event time and its ratio to the full copy (below 1: cheaper than copying the population),
* bandwidth over the values that were selected (bytes moved per second), and its ratio to
  the copy's bandwidth (how far the sparse gather/scatter is from streaming memory),
* the share of the event spent deriving masks.

    python benchmarks/shuffle_throughput.py [--members 4] [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from wash_fed.models import resnet18_cifar
from wash_fed.shuffle import event_mask, layer_probs, shuffle_population


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probs", default="0.001,0.01,0.1,1.0")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    population = [
        [p.detach().to(device) for p in resnet18_cifar().parameters()] for _ in range(args.members)
    ]
    numels = [t.numel() for t in population[0]]
    n_params = sum(numels)
    copy_bytes = 4 * n_params * args.members
    targets = [[torch.empty_like(t) for t in m] for m in population]

    def copy_all() -> None:
        for src, dst in zip(population, targets, strict=True):
            for s, d in zip(src, dst, strict=True):
                d.copy_(s)

    t_copy = _timed(copy_all, device, args.repeats)
    print(
        f"ResNet-18 (CIFAR form): {n_params / 1e6:.2f} M parameters in {len(numels)} tensors, "
        f"N = {args.members}, device {device}, torch {torch.__version__}"
    )
    copy_bandwidth = copy_bytes / t_copy
    print(
        f"plain copy of the population: {t_copy * 1e3:.2f} ms ({copy_bandwidth / 1e9:.2f} GB/s)\n"
    )
    print(
        "| p (linear) | selected/member | event (ms) | event / copy | moved GB/s "
        "| bandwidth / copy's | masks share |"
    )
    print("|---|---|---|---|---|---|---|")
    groups = [{"weights": m} for m in population]
    for event, p in enumerate(float(x) for x in args.probs.split(",")):
        probs = layer_probs(p, len(numels), "linear")

        def shuffle_event(p_l: list[float] = probs, r: int = event) -> None:
            mask = event_mask(numels, p_l, seed=0, event=r)
            shuffle_population(groups, mask, seed=0, event=r)

        def masks_only(p_l: list[float] = probs, r: int = event) -> None:
            event_mask(numels, p_l, seed=0, event=r)

        t_event = _timed(shuffle_event, device, args.repeats)
        t_mask = _timed(masks_only, device, args.repeats)
        selected = event_mask(numels, probs, seed=0, event=event).num_selected
        moved_bytes = 4 * selected * args.members
        bandwidth = moved_bytes / t_event
        print(
            f"| {p:g} | {selected:,} ({selected / n_params:.2%}) | {t_event * 1e3:.2f} | "
            f"{t_event / t_copy:.2f} | {bandwidth / 1e9:.3f} | {bandwidth / copy_bandwidth:.3f} | "
            f"{t_mask / t_event:.0%} |"
        )


if __name__ == "__main__":
    main()
