"""How close honest members come to the reply gate's bounds, on real training.

Runs the population trainer (the member protocol in one process, the same gate as a Flower
run) for a few settings and records, at every exchange and for every tensor the gate
judges, how far the honest members are from being rejected:

* distance: the largest member's root-mean-square distance from the coordinate-wise
  median, in units of the members' typical distance (rejected above ``outlier-factor``);
* direction: the largest stray of a member's projection on the median from the members'
  median projection, against its limit ``max(ALIGNMENT_FLOOR, ALIGNMENT_FACTOR * radius)``.

    python benchmarks/gate_margins.py                 # every setting, 10 rounds each
    python benchmarks/gate_margins.py --rounds 5 --settings wash,dirichlet
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from wash_fed import gate
from wash_fed.config import ConfigValue, WashFedConfig
from wash_fed.population import run_population

SETTINGS: dict[str, dict[str, ConfigValue]] = {
    "wash": {},
    "dirichlet": {"partition": "dirichlet", "dirichlet-alpha": 0.1},
    "different-init": {"init": "different"},
    "wash+opt": {"shuffle-optimizer-state": True},
    "papa": {"strategy": "papa"},
    "papa-dirichlet-different": {
        "strategy": "papa",
        "init": "different",
        "partition": "dirichlet",
        "dirichlet-alpha": 0.1,
    },
    "wash-int8": {"wire-dtype": "int8"},
    "wash-int4": {"wire-dtype": "int4"},
    "papa-int8": {"strategy": "papa", "wire-dtype": "int8"},
    "papa-int4": {"strategy": "papa", "wire-dtype": "int4"},
}


@dataclass
class Margins:
    """The honest members' closest approach to the gate's bounds in one run."""

    exchanges: int = 0
    distance: float = 0.0
    """Largest distance score seen (the bound is ``outlier-factor``)."""
    stray: float = 0.0
    """Largest projection stray seen ..."""
    stray_limit: float = 0.0
    """... and its limit there."""
    rejected: list[str] = field(default_factory=list)

    def observe(
        self, payloads: Mapping[int, Mapping[str, Tensor]], statistics: Collection[str]
    ) -> None:
        """Watch one exchange's payloads as the gate judges them (``statistics``: by
        distance only)."""
        members = sorted(payloads)
        if len(members) < 3:
            return
        self.exchanges += 1
        for name, first in payloads[members[0]].items():
            if not first.is_floating_point() or not first.numel():
                continue
            stacked = torch.stack([payloads[m][name].double().reshape(-1) for m in members])
            median = stacked.median(dim=0).values
            distances = (stacked - median).pow(2).mean(dim=1).sqrt()
            floor = 1e-3 * float(median.pow(2).mean().sqrt()) + 1e-12
            typical = max(float(distances.sort().values[len(members) // 2]), floor)
            self.distance = max(self.distance, float(distances.max()) / typical)
            scale = float(median.pow(2).sum())
            if median.numel() < gate.ALIGNMENT_MIN_SIZE or scale == 0.0 or name in statistics:
                continue
            projections = stacked @ median / scale
            strays = (projections - projections.median()).abs()
            radius = float(strays.sort().values[len(members) // 2])
            if float(strays.max()) > self.stray:
                self.stray = float(strays.max())
                self.stray_limit = max(gate.ALIGNMENT_FLOOR, gate.ALIGNMENT_FACTOR * radius)


def measure(setting: str, rounds: int) -> tuple[Margins, float]:
    """Train ``setting`` for ``rounds`` rounds, watching every exchange's payloads."""
    margins = Margins()
    judge = gate.magnitude_outliers  # the member protocol's own gate, watched below

    def watched(
        payloads: Mapping[int, Mapping[str, Tensor]],
        factor: float,
        *,
        statistics: Collection[str] = (),
    ) -> dict[int, str]:
        margins.observe(payloads, statistics)
        outliers = judge(payloads, factor, statistics=statistics)
        margins.rejected += [f"member {m}: {why}" for m, why in outliers.items()]
        return outliers

    # float16 unless the setting names a wire-dtype: the precision the margins were measured in.
    base: dict[str, ConfigValue] = {"num-server-rounds": rounds, "wire-dtype": "float16"}
    cfg = WashFedConfig.from_mapping({**base, **SETTINGS[setting]})
    gate.magnitude_outliers = watched  # the name ReplyGate.admit calls
    try:
        run = run_population(cfg, log=lambda _: None, progress_eval=False)
    finally:
        gate.magnitude_outliers = judge
    return margins, run.results.final_figures().final_accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args(argv)
    print(
        "| setting | exchanges | largest distance score (bound 50) | largest projection stray "
        "| its limit | honest members rejected | soup | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        started = time.perf_counter()
        margins, soup = measure(setting, args.rounds)
        print(
            f"| {setting} | {margins.exchanges} | {margins.distance:.2f} | {margins.stray:.4f} "
            f"| {margins.stray_limit:.2f} | {len(margins.rejected)} | {soup:.4f} "
            f"| {time.perf_counter() - started:.0f} |",
            flush=True,
        )
        for reason in margins.rejected:
            print(f"  rejected: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
