"""One faulty member among four cannot sink a run: real `flwr run` simulations of an app
copy in which member 3 corrupts its replies (tests/e2e/faulty_app.py). Every run ends
completed and names the member in its log and results; and, with deterministic training,
it ends exactly as the run in which that member never answered: the same exchanges, the
same members, the same soup (or FedAvg's global model), bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from deploy.app_copies import faulty_app_copy
from deploy.processes import TINY_RUN, FlowerHarness
from wash_fed.config import ConfigValue
from wash_fed.ledger import Ledger
from wash_fed.results import RunResult, read_results

pytestmark = pytest.mark.slow

MEMBERS, FAULTY = 4, 3
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"
CONFIG: dict[str, ConfigValue] = {
    **TINY_RUN,
    "num-members": MEMBERS,
    "num-server-rounds": 3,
    "local-steps": 10,
    "shuffle-prob": 0.1,
    "deterministic": True,
    "save-members": True,
}
"""Three rounds: a member rejected in each of them is quarantined (quarantine-after 3)."""
ROUND_FAULTS = ["crash-shaped", "nan", "scaled", "sign-flip", "zeros", "false-id"]
"""Through Flower; huge (1e30) and float64 values take the same gate paths as scaled and
NaN ones and are tested on the gate itself (tests/unit/test_gate.py)."""
ABSENT = dict.fromkeys(ROUND_FAULTS, "absent") | {"final-step": "absent-final"}
"""The run each fault must equal: member 3 never answers what it corrupts."""
SAME = ("members", "member_mean", "ensemble", "soups", "final_accuracy", "collected")
"""Final figures of a population run that a faulty run shares with its reference."""


@dataclass
class Run:
    output: str
    results: RunResult
    directory: Path

    def saved(self, name: str) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = torch.load(self.directory / name)["state_dict"]
        return state


RunWith = Callable[[str, str], Run]


@pytest.fixture(scope="module")
def run_with(
    simulation_harness: FlowerHarness, tmp_path_factory: pytest.TempPathFactory
) -> RunWith:
    """Runs of a strategy with a given fault (once each), on one simulation SuperLink."""
    root = tmp_path_factory.mktemp("faulty")
    done: dict[tuple[str, str], Run] = {}

    def run(fault: str, strategy: str) -> Run:
        if (fault, strategy) not in done:
            config = {**CONFIG, "strategy": strategy, "output-dir": str(root / "runs")}
            app = faulty_app_copy(root / strategy / f"app-{fault}", fault, FAULTY)
            result = simulation_harness.run(config, federation_config=FEDERATION, app=app)
            assert result.status == "finished:completed", (
                f"{fault}: {result.details}\n{result.output[-3000:]}"
            )
            (run_dir,) = (root / "runs").glob(f"*-{result.run_id}")
            done[fault, strategy] = Run(result.output, read_results(run_dir), run_dir)
        return done[fault, strategy]

    return run


def rejected(run: Run) -> set[int]:
    """The members whose replies the results name as rejected, anywhere in the run."""
    found = {int(k) for row in run.results.rounds for k in row.rejected}
    return found | {int(k) for k in run.results.final_figures().rejected}


def named(run: Run) -> bool:
    """Whether the log and the results name member 3 as rejected, and no one else."""
    return rejected(run) == {FAULTY} and f"member {FAULTY} rejected" in run.output


def assert_same_models(faulty: Run, absent: Run, names: tuple[str, ...]) -> None:
    assert [r.exchange_digest for r in faulty.results.rounds] == [
        r.exchange_digest for r in absent.results.rounds
    ], "the honest members exchanged other values"
    for name in names:
        mine, theirs = faulty.saved(name), absent.saved(name)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"{name} differs"


@pytest.mark.parametrize("fault", [*ROUND_FAULTS, "final-step"])
def test_one_faulty_member_cannot_sink_the_run(run_with: RunWith, fault: str) -> None:
    faulty, absent = run_with(fault, "wash"), run_with(ABSENT[fault], "wash")
    assert rejected(absent) == set(), "the gate rejected an honest member"
    assert named(faulty), faulty.output[-3000:]
    final, reference = faulty.results.final_figures(), absent.results.final_figures()
    if fault in ROUND_FAULTS:  # rejected three rounds in a row: quarantined, out of the soup
        assert final.quarantined == [FAULTY] == reference.quarantined
        assert f"member {FAULTY} quarantined after 3 rejected or failed replies" in faulty.output
        honest_values = faulty.results.rounds[0].exchange["participants"]
        assert honest_values == MEMBERS - 1  # nobody received anything from it
    else:  # its BatchNorm statistics and its evaluations are rejected
        assert final.rejected[str(FAULTY)].startswith("BatchNorm statistics")
        assert f"member {FAULTY} rejected (evaluation)" in faulty.output
    assert str(FAULTY) not in final.members_own_evaluation
    assert final.members_own_evaluation == reference.members_own_evaluation
    assert {k: getattr(final, k) for k in SAME} == {k: getattr(reference, k) for k in SAME}
    assert_same_models(faulty, absent, ("members.pt", "final_model.pt"))


def test_a_false_partition_id_moves_no_bytes_in_the_ledger(run_with: RunWith) -> None:
    """Member 3 says it is member 0: its replies are rejected, and the ledger keeps its
    bytes where the server's own map puts them."""
    faulty = run_with("false-id", "wash")
    assert "reports partition-id 0, but its node holds member 3" in faulty.output
    ledger = Ledger.read_csv(faulty.directory / "ledger.csv")
    rounds = faulty.results.config.num_server_rounds
    replies = [  # the last round's replies are the members' models, ledger phase collect
        e.member
        for e in ledger.entries
        if e.direction == "up" and e.round <= rounds and e.phase in ("train", "collect")
    ]
    assert sorted(replies) == sorted([*range(MEMBERS)] * rounds)


def test_a_member_scaled_x1000_cannot_poison_fedavg(run_with: RunWith) -> None:
    """Flower's FedAvg behind the reply gate: the scaled model is left out of every
    average, and the global model is the one FedAvg builds without that member."""
    faulty, absent = run_with("scaled", "fedavg"), run_with("absent", "fedavg")
    assert rejected(absent) == set(), "the gate rejected an honest member"
    assert named(faulty), faulty.output[-3000:]
    assert all(str(FAULTY) in row.rejected for row in faulty.results.rounds)
    assert faulty.results.final_figures() == absent.results.final_figures()
    assert_same_models(faulty, absent, ("final_model.pt",))
