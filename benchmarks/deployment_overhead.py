"""Per-round wall time of a real local deployment that is not spent training.

Starts a SuperLink and N SuperNodes on loopback (deploy/processes.py, the topology
of docker-compose.yml), runs a short WASH run under each runtime, and prints side by side
the median round time, the members' training, restore, handler and checkpoint times (from
their replies), and the overhead: round time minus the slowest member's training.

Runtimes:
* ``process per message``: Flower 1.42's own model -- every message starts a ClientApp
  process that restores the member from ``context.state``;
* ``worker``: the member lives in its node's member worker (``worker-dir``), the ClientApp
  only forwards the message to it;
* ``simulation``: the same work through ``flwr run`` against a simulation SuperLink (Ray
  actors), for reference;
* ``compose``: the worker runtime in containers, ``docker-compose.yml`` brought up by
  ``make compose-up``'s own code (deploy/roles.py; TLS, SuperNode
  authentication and the proxies included; the CNN only, on the stack's mounted data);
* ``floor``: Flower's own floor, the same process deployment running
  ``benchmarks/flower_floor`` (a ClientApp that replies at once, no torch), and
  ``compose floor`` the same on the compose stack: what a round costs Flower alone.

Every runtime polls as fast as this project lets it (server 0.2 s, SuperExec 0.1 s), reads
the data set from the tensor file ``prepare`` writes, and gives each member one thread
(``OMP_NUM_THREADS=1``, as Ray does for simulation actors: four members share two cores
here). Models: the small CNN on Fashion-MNIST, and ResNet-18 (CIFAR form, 11 M parameters)
on synthetic 32x32 images. It also times what Flower itself costs every message whatever
the runtime: starting a ``flwr-clientapp`` process (its imports).

    python benchmarks/deployment_overhead.py [--rounds 8] [--supernodes 4] [--models cnn,resnet18]
        [--runtimes "floor,process per message,worker,simulation,compose floor,compose"]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.flwr_cli import PROJECT
from deploy.processes import TINY_RUN, FlowerHarness
from deploy.roles import all_in_one_running
from deploy.stack import Stack
from wash_fed.config import ConfigValue
from wash_fed.data import write_synthetic
from wash_fed.keys import Metric
from wash_fed.results import RoundResult, read_results

RUNTIMES = (
    "floor",
    "process per message",
    "worker",
    "simulation",
    "compose floor",
    "compose",
)
FLOORS = ("floor", "compose floor")
"""Runtimes that measure Flower alone: one row each, whatever the models."""
FLOOR_APP = PROJECT / "benchmarks" / "flower_floor"
STACK_RUNS = "/app/runs"
"""Where runs on the compose stack write (the SuperLink container's volume)."""
ROUND_TIMEOUT = 120.0
"""Seconds a round waits for its members: a runtime that loses members shows it as fewer
members answering, at a bounded cost."""


@dataclass(frozen=True)
class Workload:
    """A model and the run configuration that trains it briefly."""

    name: str
    run_config: dict[str, ConfigValue]
    synthetic: bool = False
    """Write a synthetic CIFAR-10-shaped data set (32x32x3, 10 classes) to train on."""


WORKLOADS = {
    "cnn": Workload("cnn", {"model": "cnn"}),
    "resnet18": Workload(
        "resnet18",
        {
            "model": "resnet18",
            "dataset": "cifar10",
            "batch-size": 16,
            "local-steps": 2,
            "train-subset": 0,
            "holdout-size": 100,
            "test-subset": 200,
            "bn-batches": 2,
            "eval-batch-size": 100,
        },
        synthetic=True,
    ),
}


def run_config(
    workload: Workload, rounds: int, supernodes: int, output: str
) -> dict[str, ConfigValue]:
    return {
        **TINY_RUN,
        **workload.run_config,
        "num-members": supernodes,
        "num-server-rounds": rounds,
        "round-timeout": ROUND_TIMEOUT,
        "output-dir": output,
    }


def floor_config(supernodes: int, rounds: int) -> dict[str, ConfigValue]:
    return {"num-members": supernodes, "num-server-rounds": rounds}


def measure(runtime: str, workload: Workload, rounds: int, supernodes: int) -> dict[str, float]:
    """One row of local processes: a SuperLink and SuperNodes (or a simulation) of our own."""
    with tempfile.TemporaryDirectory(prefix="wf-") as tmp:
        home = Path(tmp)
        harness = FlowerHarness(home)
        harness.env["OMP_NUM_THREADS"] = "1"
        config = run_config(workload, rounds, supernodes, str(home / "runs"))
        if workload.synthetic:
            write_synthetic("cifar10", home / "data")
            config["data-root"] = str(home / "data")
        federation = None
        workers = home / "w"
        try:
            if runtime == "simulation":
                harness.start_superlink(simulation=True)
                federation = f"num-supernodes={supernodes} client-resources-num-cpus=1"
            else:
                harness.start_superlink(simulation=False)
                harness.start_supernodes(
                    supernodes, worker_dir=workers if runtime == "worker" else None
                )
            if runtime == "floor":
                floor = harness.run(floor_config(supernodes, rounds), app=FLOOR_APP)
                check_completed(floor.status, floor.output, runtime)
                return floor_summary(floor.output)
            result = harness.run(config, federation_config=federation, timeout=3600)
            check_completed(result.status, result.output, runtime)
            (run_dir,) = (home / "runs").glob(f"*-{result.run_id}")
            rows = read_results(run_dir).rounds
        except BaseException:  # also Ctrl-C or `timeout -s INT`: say where it stood
            print(f"{runtime} did not finish; its logs end:\n{harness.describe(workers)}")
            raise
        finally:
            harness.close()
    return summarize(rows, supernodes)


def measure_on_stack(
    stack: Stack, runtime: str, workload: Workload, rounds: int, supernodes: int
) -> dict[str, float]:
    """One row on the compose stack (its members live in workers in their containers)."""
    if runtime == "compose floor":
        floor = stack.run(floor_config(supernodes, rounds), app=FLOOR_APP)
        check_completed(floor.status, floor.output, runtime)
        return floor_summary(floor.output)
    run = stack.run(run_config(workload, rounds, supernodes, STACK_RUNS))
    check_completed(run.status, run.output, runtime)
    with tempfile.TemporaryDirectory(prefix="wf-") as tmp:
        rows = read_results(stack.fetch_run(STACK_RUNS, run.run_id, Path(tmp) / "run")).rounds
    return summarize(rows, supernodes)


def check_completed(status: str, output: str, runtime: str) -> None:
    if status != "finished:completed":
        raise RuntimeError(f"{runtime}: the run ended {status}:\n{output[-3000:]}")


def floor_summary(output: str) -> dict[str, float]:
    """The floor app's round times (its last log line) as a row: all of a round is Flower's."""
    found = re.search(r"floor rounds: (\[.*?\])", output)
    if found is None:
        raise RuntimeError(f"the floor app printed no round times:\n{output[-3000:]}")
    seconds = json.loads(found.group(1))
    steady = seconds[1:] or seconds
    nothing = dict.fromkeys(("train", "restore", "handler", "checkpoint"), math.nan)
    return {
        **nothing,
        "answered": 1.0,
        "round": statistics.median(steady),
        "overhead": statistics.median(steady),
        "first_round": seconds[0],
    }


def summarize(rows: Sequence[RoundResult], members: int) -> dict[str, float]:
    """The share of members answering a round, and medians over the rounds after the first
    (which also starts every member)."""
    steady = rows[1:] or rows

    def slowest(row: RoundResult, key: str) -> float:
        return max(m.get(key, 0.0) for m in row.members.values())

    def median_of(key: str) -> float:
        return statistics.median(slowest(r, key) for r in steady)

    return {
        "answered": statistics.mean(r.answered for r in rows) / members,
        "round": statistics.median(r.seconds for r in steady),
        "train": median_of(Metric.TRAIN_SECONDS),
        "restore": median_of(Metric.RESTORE_SECONDS),
        "handler": median_of(Metric.HANDLER_SECONDS),
        "checkpoint": median_of(Metric.CHECKPOINT_SECONDS),
        "overhead": statistics.median(r.seconds - slowest(r, Metric.TRAIN_SECONDS) for r in steady),
        "first_round": rows[0].seconds,
    }


def clientapp_start_seconds(repeats: int = 5) -> float:
    """Median wall time of a fresh interpreter importing what ``flwr-clientapp`` imports
    before it runs a handler (its runtime module, then this app's ClientApp)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import flwr.supernode.runtime.run_clientapp, client.app"],
            check=True,
            cwd=PROJECT,
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times)


COLUMNS = [
    "answered",
    "round",
    "train",
    "restore",
    "handler",
    "checkpoint",
    "overhead",
    "first_round",
]


def planned_rows(models: list[str], runtimes: list[str]) -> list[tuple[str, str]]:
    """(model, runtime) rows in the order they run: Flower's floors (no model) first; the
    compose stack trains the CNN only (it mounts the host's Fashion-MNIST)."""
    floors = [("-", r) for r in runtimes if r in FLOORS]
    return floors + [
        (m, r)
        for m in models
        for r in runtimes
        if r not in FLOORS and not (r == "compose" and WORKLOADS[m].synthetic)
    ]


def cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--models", default=",".join(WORKLOADS))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    args = parser.parse_args()
    rows = planned_rows(args.models.split(","), args.runtimes.split(","))
    on_stack = any(runtime.startswith("compose") for _, runtime in rows)
    results: dict[tuple[str, str], dict[str, float]] = {}
    stack_if_needed = (
        all_in_one_running(args.supernodes, "wash-fed-bench")
        if on_stack
        else contextlib.nullcontext()
    )
    with stack_if_needed as stack:
        for model, runtime in rows:
            print(f"--- {model}, {runtime}", flush=True)
            workload = WORKLOADS.get(model, WORKLOADS["cnn"])
            if runtime.startswith("compose"):
                assert isinstance(stack, Stack)
                row = measure_on_stack(stack, runtime, workload, args.rounds, args.supernodes)
            else:
                row = measure(runtime, workload, args.rounds, args.supernodes)
            results[model, runtime] = row
            print(json.dumps(row), flush=True)
    print(
        f"\n{args.supernodes} members, WASH, {args.rounds} rounds; seconds, medians over "
        f"rounds 2..{args.rounds} (slowest member per round); floor: Flower alone"
    )
    print(
        "| model | runtime | members answering | round | training | restore | handler "
        "| checkpoint | overhead | first round |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (model, runtime), r in results.items():
        print(f"| {model} | {runtime} | " + " | ".join(cell(r[c]) for c in COLUMNS) + " |")
    print(
        f"\nFlower's own cost per message, any runtime: starting flwr-clientapp (imports) "
        f"{clientapp_start_seconds():.2f} s; the SuperNode waits a fixed 3 s between checks "
        "for new messages (flwr 1.42, supernode/start_client_internal.py)"
    )
    for floor, ours in (("floor", "worker"), ("compose floor", "compose")):
        alone, with_us = results.get(("-", floor)), results.get(("cnn", ours))
        if alone and with_us:
            print(
                f"cnn, {ours}: Flower's floor is {alone['round'] / with_us['round']:.2f} of a "
                f"round ({alone['round']:.2f} of {with_us['round']:.2f} s)"
            )
    for model in args.models.split(","):
        old, new = results.get((model, "process per message")), results.get((model, "worker"))
        if old and new:
            print(
                f"{model}: overhead with the worker / process per message: "
                f"{new['overhead'] / old['overhead']:.2f} "
                f"({old['overhead'] - new['overhead']:.2f} s less per round)"
            )


if __name__ == "__main__":
    main()
