"""What one well-formed but hostile member of four does to a run, through real `flwr run`
simulations: honest runs over several seeds give the spread a soup may fall in; each fault
(deploy/faulty_app.py: drift, sign-flip, zeros, ...) then runs on seed 0, and the table
says when the gate named the member, whether it was quarantined, and where the soup ended.

    python benchmarks/poisoned_member.py                       # 10 rounds, seeds 0,1,2
    python benchmarks/poisoned_member.py --faults drift --rounds 30
    python benchmarks/poisoned_member.py --set "wire-dtype='int8'" --seeds 0 --faults sign-flip
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path

from flwr.common.config import parse_config_args

from deploy.app_copies import faulty_app_copy
from deploy.processes import FlowerHarness
from wash_fed.config import ConfigValue
from wash_fed.results import RunResult, read_results

MEMBERS, FAULTY = 4, 3
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"


def run(
    harness: FlowerHarness,
    root: Path,
    fault: str,
    seed: int,
    rounds: int,
    extra: Mapping[str, ConfigValue],
) -> RunResult:
    """One run of the app copy with ``fault`` (``none``: everyone honest) and the ``extra``
    run config; its results."""
    app = faulty_app_copy(root / f"app-{fault}-{seed}", fault, FAULTY)
    config: dict[str, ConfigValue] = {
        **extra,
        "num-members": MEMBERS,
        "num-server-rounds": rounds,
        "seed": seed,
        "eval-every": 0,
        "output-dir": str(root / "runs"),
    }
    result = harness.run(config, federation_config=FEDERATION, app=app, timeout=3600)
    if result.status != "finished:completed":
        raise RuntimeError(f"{fault}, seed {seed}: {result.status} {result.details}")
    (run_dir,) = (root / "runs").glob(f"*-{result.run_id}")
    return read_results(run_dir)


def named_at(results: RunResult) -> str:
    """The first round in which the faulty member was rejected ("-": never)."""
    rounds = [r.round for r in results.rounds if str(FAULTY) in r.rejected]
    return str(rounds[0]) if rounds else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the honest runs")
    parser.add_argument("--faults", default="drift,sign-flip,zeros")
    parser.add_argument("--set", default="", help="more run config for every run: 'k=v ...'")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = parse_config_args([args.set]) if args.set.strip() else {}
    with tempfile.TemporaryDirectory(prefix="poison-") as folder:
        root = Path(folder)
        with FlowerHarness(root / "flwr-home") as harness:
            harness.start_superlink(simulation=True)
            honest = [run(harness, root, "none", seed, args.rounds, extra) for seed in seeds]
            faulty = {
                f: run(harness, root, f, 0, args.rounds, extra) for f in args.faults.split(",")
            }
    soups = [r.final_figures().final_accuracy for r in honest]
    members = [r.final_figures().member_mean or 0.0 for r in honest]
    print(
        f"honest, seeds {args.seeds}: soup {statistics.fmean(soups):.4f} "
        f"(min {min(soups):.4f}, max {max(soups):.4f}), members' mean "
        f"{statistics.fmean(members):.4f}; {args.rounds} rounds of 50 steps, 4 members"
    )
    print("| fault (seed 0) | first rejected in round | quarantined | soup | members' mean |")
    print("|---|---|---|---|---|")
    for fault, results in faulty.items():
        final = results.final_figures()
        print(
            f"| {fault} | {named_at(results)} | {FAULTY in final.quarantined} "
            f"| {final.final_accuracy:.4f} | {final.member_mean or 0.0:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
