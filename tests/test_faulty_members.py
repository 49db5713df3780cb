"""One faulty member among four cannot sink a run: real `flwr run` simulations of an app
copy in which member 3 corrupts its replies (tests/faulty_app.py). Every run ends
completed, names the member in its log and results, and its soup stays within one point
of the all-honest run's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from simulations.local_flower import PROJECT, TINY_RUN, FlowerHarness, copy_app

pytestmark = pytest.mark.slow

MEMBERS, FAULTY = 4, 3
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"
CONFIG: dict[str, Any] = {
    **TINY_RUN,
    "num-members": MEMBERS,
    "num-server-rounds": 4,
    "local-steps": 25,
    "train-subset": 6000,
    "test-subset": 2000,
    "shuffle-prob": 0.1,
}
ROUND_FAULTS = ["crash-shaped", "nan", "scaled"]
"""Through Flower; huge (1e30) and float64 values take the same gate paths as scaled and
NaN ones and are tested on the gate itself (tests/test_gate.py)."""


def app_copy(root: Path, fault: str) -> Path:
    """This app with tests/faulty_app.py as its ClientApp and ``fault`` for member 3."""
    app = copy_app(root / f"app-{fault}")
    (app / "faulty").mkdir()
    (app / "faulty" / "__init__.py").write_text("")
    shutil.copy(PROJECT / "tests" / "faulty_app.py", app / "faulty" / "app.py")
    (app / "faulty" / "fault.py").write_text(f"FAULT = {fault!r}\nMEMBER = {FAULTY}\n")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'clientapp = "client.app:app"', 'clientapp = "faulty.app:app"'
        )
    )
    return app


@pytest.fixture(scope="module")
def run_with(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Run]]:
    """Runs the app with a given fault (once each), on one simulation SuperLink."""
    harness = FlowerHarness(tmp_path_factory.mktemp("flwr-home"))
    root = tmp_path_factory.mktemp("faulty")
    done: dict[str, Run] = {}

    def run(fault: str) -> Run:
        if fault not in done:
            config = {**CONFIG, "output-dir": str(root / "runs")}
            app = app_copy(root, fault)
            result = harness.run(config, federation_config=FEDERATION, app=app)
            assert result.status == "finished:completed", (
                f"{fault}: {result.details}\n{result.output[-3000:]}"
            )
            (run_dir,) = (root / "runs").glob(f"*-{result.run_id}")
            done[fault] = Run(result.output, json.loads((run_dir / "results.json").read_text()))
        return done[fault]

    try:
        harness.start_superlink(simulation=True)
        yield run
    finally:
        harness.close()


@dataclass
class Run:
    output: str
    results: dict[str, Any]


def rejections(run: Run) -> set[int]:
    """The members the results name as rejected or quarantined, anywhere in the run."""
    final = run.results["final"]
    found = {int(k) for row in run.results["rounds"] for k in row["rejected"]}
    return found | {int(k) for k in final["rejected"]} | set(final["quarantined"])


def named(run: Run) -> bool:
    """Whether the log and the results name member 3 as rejected, and no one else."""
    in_log = f"member {FAULTY} rejected" in run.output or f"member {FAULTY}: its" in run.output
    return rejections(run) == {FAULTY} and in_log


@pytest.mark.parametrize("fault", [*ROUND_FAULTS, "final-step"])
def test_one_faulty_member_cannot_sink_the_run(run_with: Callable[[str], Run], fault: str) -> None:
    honest, faulty = run_with("none"), run_with(fault)
    assert rejections(honest) == set(), "the gate rejected an honest member"
    assert named(faulty), faulty.output[-3000:]
    final, reference = faulty.results["final"], honest.results["final"]
    assert abs(final["final_accuracy"] - reference["final_accuracy"]) <= 0.01
    if fault in ROUND_FAULTS:  # rejected three rounds in a row: quarantined, out of the soup
        assert final["quarantined"] == [FAULTY] and FAULTY not in final["collected"]
        assert f"member {FAULTY} quarantined after 3 rejections in a row" in faulty.output
        honest_values = faulty.results["rounds"][0]["exchange"]["participants"]
        assert honest_values == MEMBERS - 1  # nobody received anything from it
    else:  # its BatchNorm statistics and its evaluations are rejected
        assert final["rejected"][str(FAULTY)].startswith("BatchNorm statistics")
        assert f"member {FAULTY}: its evaluation" in faulty.output
        assert str(FAULTY) not in final["members_own_evaluation"]
