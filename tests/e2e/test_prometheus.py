"""A real Prometheus server scraping real `flwr run` simulations of WASH and FedAvg, and of
an app of the user's own (examples/sequence, WASH+Opt on the public API): it sees the
ledgers' bytes, where each round's time went, and answers every dashboard query."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.flwr_cli import PROJECT
from deploy.processes import TINY_RUN, FlowerHarness, free_port
from deploy.promql import LocalPrometheus
from wash_fed.config import ConfigValue
from wash_fed.ledger import Ledger
from wash_fed.results import RoundResult, read_results
from wash_fed.timing import PARTS

MEMBERS = 3
SMALL: dict[str, ConfigValue] = {**TINY_RUN, "num-members": MEMBERS, "eval-every": 1}
SEQUENCE: dict[str, ConfigValue] = {"num-members": MEMBERS, "num-server-rounds": 2}
"""The sequence example, short."""


@dataclass
class ScrapedRuns:
    prometheus: LocalPrometheus
    ledgers: dict[str, Ledger]
    rounds: dict[str, list[RoundResult]]
    """Per strategy, the rounds in its results.json."""


@pytest.fixture(scope="module")
def scraped_runs(
    simulation_harness: FlowerHarness, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScrapedRuns]:
    """WASH, FedAvg, then the sequence example, through real `flwr run` simulations,
    scraped by a real Prometheus."""
    if shutil.which("prometheus") is None:
        pytest.fail(
            "prometheus is not installed (Debian: apt-get install prometheus; make test does)"
        )
    metrics_port = free_port()
    out = tmp_path_factory.mktemp("runs")
    with LocalPrometheus(tmp_path_factory.mktemp("prometheus"), metrics_port) as prom:
        ledgers, rounds = {}, {}
        federation = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"
        sequence = {**SEQUENCE, "final-model": str(out / "soup.pt")}
        runs: list[tuple[str, dict[str, ConfigValue], Path]] = [
            ("wash", {**SMALL, "strategy": "wash"}, PROJECT),
            ("fedavg", {**SMALL, "strategy": "fedavg"}, PROJECT),
            ("wash+opt", sequence, PROJECT / "examples" / "sequence"),
        ]
        for label, settings, app in runs:
            config = {
                **settings,
                "output-dir": str(out),
                "metrics-port": metrics_port,
                "metrics-grace": 4.0,
            }
            result = simulation_harness.run(config, app=app, federation_config=federation)
            assert result.status == "finished:completed", result.details + result.output[-3000:]
            (run_dir,) = out.glob(f"*-{result.run_id}")
            ledgers[label] = Ledger.read_csv(run_dir / "ledger.csv")
            rounds[label] = read_results(run_dir).rounds
        yield ScrapedRuns(prom, ledgers, rounds)


@pytest.mark.slow
def test_prometheus_sees_the_ledgers_bytes_of_every_run(scraped_runs: ScrapedRuns) -> None:
    prom, ledgers = scraped_runs.prometheus, scraped_runs.ledgers

    def scraped(strategy: str, direction: str) -> float:
        rows = prom.query(
            f'sum(max_over_time(wash_fed_bytes_total{{strategy="{strategy}",direction="{direction}"}}[30m]))'
        )
        return rows[0].value if rows else -1.0

    for strategy, ledger in ledgers.items():
        for direction in ("up", "down"):
            assert scraped(strategy, direction) == ledger.total(direction), (strategy, direction)
    ratio = prom.query(
        'sum(max_over_time(wash_fed_bytes_total{strategy="wash",phase="train"}[30m]))'
        ' / sum(max_over_time(wash_fed_bytes_total{strategy="fedavg",phase="train"}[30m]))'
    )
    expected = ledgers["wash"].total(phase="train") / ledgers["fedavg"].total(phase="train")
    assert ratio[0].value == pytest.approx(expected, rel=1e-12)
    assert expected < 0.1  # WASH's training traffic is a small fraction of FedAvg's
    rounds = prom.query('max_over_time(wash_fed_rounds_total{strategy="wash"}[30m])')
    assert rounds[0].value == SMALL["num-server-rounds"]
    soup = prom.query('max_over_time(wash_fed_accuracy{strategy="wash",model="soup"}[30m])')
    assert 0.0 < soup[0].value <= 1.0


@pytest.mark.slow
def test_prometheus_sees_where_each_rounds_time_went(scraped_runs: ScrapedRuns) -> None:
    """Each round's parts (results.json) sum to its duration, computing takes part of it
    (simulated members train in the round), nothing is transfer (no link in simulation;
    Flower's delivery is), and Prometheus holds the same parts."""
    prom = scraped_runs.prometheus
    for strategy, rows in scraped_runs.rounds.items():
        split = [row.time for row in rows]
        assert all(split), f"{strategy}: a round without its time split"
        for row, time in zip(rows, split, strict=True):
            assert time is not None
            assert sum(time.as_dict().values()) == pytest.approx(row.seconds, abs=1e-9)
            assert 0.0 < time.compute < row.seconds, (strategy, time)
            assert time.delivery > 0.0 and time.transfer == 0.0, (strategy, time)
        if (os.cpu_count() or 1) < MEMBERS:  # one slot per CPU: the last member waited
            assert all(time.slot > 0.0 for time in split if time is not None), (strategy, split)
        for part in PARTS:
            scraped = prom.query(
                f'max_over_time(wash_fed_round_part_seconds_total{{strategy="{strategy}",'
                f'part="{part}"}}[30m])'
            )
            expected = sum(t.as_dict()[part] for t in split if t is not None)
            assert scraped[0].value == pytest.approx(expected, rel=1e-9), part


@pytest.mark.slow
def test_every_dashboard_query_runs_on_prometheus(scraped_runs: ScrapedRuns) -> None:
    """The Grafana panels' PromQL, evaluated by the real Prometheus over the runs above."""
    prom = scraped_runs.prometheus
    dashboard = json.loads((PROJECT / "deploy/grafana/dashboards/wash-fed.json").read_text())
    answered = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # Ranges sized for a live run; the runs above are short and already over.
            expr = target["expr"].replace("[1m]", "[30m]")
            expr = f"max_over_time(({expr})[30m:1s])"
            answered += bool(prom.query(expr))
    assert answered >= 9, "most panels should show data for the runs above"
