"""Per-round wall time of a real local deployment that is not spent training.

Starts a SuperLink and N SuperNodes on loopback (simulations/local_flower.py, the topology
of docker-compose.yml), runs a short WASH run under each setting, and prints side by side
the median round time, the members' training time and handler time (from their replies),
and the overhead: round time minus the slowest member's training.

Settings, each a change on top of the one before:
* ``before``: the server polls for replies every 3 s (Flower's own ``send_and_receive``
  loop), SuperExec looks for tasks every 1 s (its default), and every ClientApp process
  decodes the data set's original files through torchvision;
* ``polling``: the server polls every 0.2 s (``poll-interval``), SuperExec every 0.1 s
  (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, set in the Dockerfile);
* ``after``: and the data set is read from the tensor file ``prepare`` writes (one
  ``torch.load``, no torchvision import).

    python benchmarks/deployment_overhead.py [--rounds 10] [--supernodes 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from simulations.local_flower import TINY_RUN, FlowerHarness
from wash_fed.data import default_root

# setting: (server poll interval, SuperExec poll interval or None for its default, tensor file)
SETTINGS: dict[str, tuple[float, str | None, bool]] = {
    "before": (3.0, None, False),
    "polling": (0.2, "0.1", False),
    "after": (0.2, "0.1", True),
}


def measure(setting: str, rounds: int, supernodes: int) -> dict[str, float]:
    poll_interval, superexec_poll, tensor_file = SETTINGS[setting]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        harness = FlowerHarness(home)
        if superexec_poll is not None:
            harness.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = superexec_poll
        if not tensor_file:  # only the original files: decoded in every ClientApp process
            raw = home / "data" / "FashionMNIST" / "raw"
            shutil.copytree(default_root() / "FashionMNIST" / "raw", raw)
            harness.env["WASH_FED_DATA"] = str(home / "data")
        try:
            harness.start_superlink(simulation=False)
            harness.start_supernodes(supernodes)
            config: dict[str, Any] = {
                **TINY_RUN,
                "num-members": supernodes,
                "num-server-rounds": rounds,
                "poll-interval": poll_interval,
                "output-dir": str(home / "runs"),
            }
            result = harness.run(config, timeout=1800)
            if result.status != "finished:completed":
                raise RuntimeError(f"{setting}: {result.details}\n{harness.describe()}")
            (run_dir,) = (home / "runs").glob(f"*-{result.run_id}")
            rows = json.loads((run_dir / "results.json").read_text())["rounds"]
        finally:
            harness.close()
    # Round 1 includes starting the run on every node; report the steady rounds after it.
    steady = rows[1:] or rows

    def slowest(row: dict[str, Any], key: str) -> float:
        return max(float(m[key]) for m in row["members"].values())

    return {
        "round": statistics.median(r["seconds"] for r in steady),
        "train": statistics.median(slowest(r, "train-seconds") for r in steady),
        "handler": statistics.median(slowest(r, "handler-seconds") for r in steady),
        "restore": statistics.median(slowest(r, "restore-seconds") for r in steady),
        "overhead": statistics.median(r["seconds"] - slowest(r, "train-seconds") for r in steady),
        "first_round": rows[0]["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    results = {s: measure(s, args.rounds, args.supernodes) for s in args.settings.split(",")}
    print(
        f"\n{args.supernodes} SuperNodes on loopback, WASH, {args.rounds} rounds of 5 steps; "
        f"seconds, medians over rounds 2..{args.rounds}"
    )
    columns = ["round", "train", "restore", "handler", "overhead", "first_round"]
    print(
        "| setting | round | slowest training | slowest restore | slowest handler | overhead "
        "| first round |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in columns) + " |")
    if {"before", "after"} <= results.keys():
        before, after = results["before"]["overhead"], results["after"]["overhead"]
        saved = before - after
        print(f"\noverhead, after / before: {after / before:.2f} ({saved:.2f} s less per round)")


if __name__ == "__main__":
    main()
