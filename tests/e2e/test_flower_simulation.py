"""End to end through real Flower: `flwr run` simulations against a SuperLink of our own."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from deploy.app_copies import copy_app
from deploy.flwr_cli import PROJECT, FlwrRun, run_config_arg
from deploy.processes import TINY_RUN, FlowerHarness
from simulations.launch import main as launch_main
from wash_fed.config import ConfigValue
from wash_fed.ledger import Ledger
from wash_fed.population import run_population
from wash_fed.protocol import final_format, payload_bytes, wire_format
from wash_fed.results import RunResult, read_results
from wash_fed.shuffle import LayerSchedule, layer_probs
from wash_fed.training import new_model

pytestmark = pytest.mark.slow

MEMBERS = 3
FEDERATION = f"num-supernodes={MEMBERS} client-resources-num-cpus=1"
SMALL: dict[str, ConfigValue] = {
    **TINY_RUN,
    "num-members": MEMBERS,
    "num-server-rounds": 2,
    "eval-every": 1,
}
# Bytes a message may carry besides its array data: metadata, metrics, records, keys, npy
# headers (measured: up to 2.3 kB and 0.4 kB an array).
FRAMING = 3000
FRAMING_PER_ARRAY = 400


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def run(
    simulation_harness: FlowerHarness, out: Path, **overrides: Any
) -> tuple[FlwrRun, RunResult, Path]:
    config = {**SMALL, "output-dir": str(out), **overrides}
    result = simulation_harness.run(config, federation_config=FEDERATION)
    assert result.status == "finished:completed", f"{result.details}\n{result.output[-4000:]}"
    (run_dir,) = out.glob(f"*-{result.run_id}")
    results = read_results(run_dir)
    assert results.status == "completed"
    assert (run_dir / "final_model.pt").is_file()
    return result, results, run_dir


def test_wash_run_sends_only_the_masked_values(
    simulation_harness: FlowerHarness, out: Path
) -> None:
    result, results, run_dir = run(simulation_harness, out, strategy="wash")
    cfg = results.config
    assert [r.round for r in results.rounds] == [1, 2]
    assert all(r.answered == MEMBERS for r in results.rounds)
    final = results.final_figures()
    assert set(final.soups) == {"uniform", "uniform+bn"} and final.final_model == "uniform+bn"
    assert len(final.members) == MEMBERS and 0.0 <= (final.ensemble or -1.0) <= 1.0
    assert "Final model:" in result.output and "FedAvg for the same 2 rounds" in result.output

    numels = [p.numel() for p in new_model(cfg).parameters()]
    probs = layer_probs(
        cfg.exchange.shuffle_prob, len(numels), cast(LayerSchedule, cfg.exchange.layer_schedule)
    )
    expected = sum(p * n for p, n in zip(probs, numels, strict=True))
    ledger = Ledger.read_csv(run_dir / "ledger.csv")
    train = [e for e in ledger.entries if e.phase == "train"]
    assert {e.member for e in train} == set(range(MEMBERS))
    # Up in the last round: the whole model in final-dtype, for the final step.
    state = new_model(cfg).state_dict()
    model = payload_bytes(final_format(cfg).encode(state))
    collect = [e for e in ledger.entries if e.phase == "collect"]
    assert sorted((e.round, e.direction) for e in collect) == [(2, "up")] * MEMBERS
    assert all(0 < e.bytes - model < FRAMING + FRAMING_PER_ARRAY * len(state) for e in collect)
    framing = []
    for e in train:
        # Up in round r: values at mask r. Down in round 2: values of shuffle event 1.
        event = e.round if e.direction == "up" else e.round - 1
        if event == 0:
            assert e.bytes < FRAMING  # round 1 down: config only
            continue
        selected = cfg.shuffle_mask(numels, event).num_selected
        assert abs(selected - expected) < 0.05 * expected  # the mask is p_l of each tensor
        # The selected values as the wire carries them (a quantized format adds its scales).
        values = wire_format(cfg).encode({"weights": torch.zeros(selected)})
        arrays = len(values)
        framing.append(e.bytes - payload_bytes(values))
    assert all(0 < f < FRAMING + FRAMING_PER_ARRAY * arrays for f in framing), framing
    assert max(framing) - min(framing) < 400, "framing should be a fixed overhead"
    assert results.sent(phase="train") == sum(e.bytes for e in train)
    assert (results.fedavg_bytes or 0) > 10 * sum(e.bytes for e in train)


def test_the_final_step_sends_each_member_the_soup_once(
    simulation_harness: FlowerHarness, out: Path
) -> None:
    """The soup goes down once, for the BatchNorm statistics; the members then evaluate the
    final model from the recalibrated BatchNorm buffers alone, in the message that ends the
    run (no separate evaluation round), and what they evaluate is the saved model: their
    accuracy on the run's test set is the server's, exactly. Flower's own per-round log
    stays out of the output, in the run's folder."""
    result, results, run_dir = run(simulation_harness, out, strategy="wash", deterministic=True)
    ledger = Ledger.read_csv(run_dir / "ledger.csv")
    model_bytes = sum(4 * t.numel() for t in new_model(results.config).state_dict().values())
    for member in range(MEMBERS):
        down = {
            phase: sum(
                e.bytes
                for e in ledger.entries
                if (e.member, e.direction, e.phase) == (member, "down", phase)
            )
            for phase in ("bn", "evaluate", "end")
        }
        assert model_bytes < down["bn"] < model_bytes + FRAMING_PER_ARRAY * 30
        assert down["evaluate"] == 0 and 0 < down["end"] < 0.05 * model_bytes, down
    final = results.final_figures()
    own = final.members_own_evaluation
    assert own == dict.fromkeys(own, final.final_accuracy) and len(own) == MEMBERS
    assert "Aggregated MetricRecord" not in result.output and "[ROUND" not in result.output
    assert "[ROUND 2/2]" in (run_dir / "flower-strategy.log").read_text()


@pytest.mark.parametrize("wire_dtype", ["float16", "int4"])
def test_fedavg_run_sends_the_full_model_each_way_in_its_wire_format(
    simulation_harness: FlowerHarness, out: Path, wire_dtype: str
) -> None:
    """Flower's FedAvg with a ``wire-dtype`` of 16 or 4 bits: the model travels encoded
    both ways (two bytes a value; half a byte and a float32 scale every 64 values; integer
    buffers as they are), Flower averages the decoded models and the run trains."""
    members = out / "fedavg-members"
    _, results, run_dir = run(
        simulation_harness,
        out,
        strategy="fedavg",
        **{"member-checkpoints": str(members), "wire-dtype": wire_dtype},
    )
    assert not members.exists(), "FedAvg does not resume: its members write no checkpoints"
    cfg = results.config
    sent = wire_format(cfg).encode(new_model(cfg).state_dict())
    model_bytes = payload_bytes(sent)
    ledger = Ledger.read_csv(run_dir / "ledger.csv")
    train = [e for e in ledger.entries if e.phase == "train"]
    assert len(train) == 2 * 2 * MEMBERS  # rounds x directions x members
    for e in train:
        assert 0 < e.bytes - model_bytes < FRAMING + FRAMING_PER_ARRAY * len(sent), e
    assert [r.test_accuracy is not None for r in results.rounds] == [True, True]
    final = results.final_figures()
    assert final.final_model == "global" and 0.0 < final.final_accuracy <= 1.0


def test_papa_run_averages_every_round_in_bfloat16(
    simulation_harness: FlowerHarness, out: Path
) -> None:
    """PAPA's weights go up and its mean comes down as bfloat16: two bytes per value."""
    _, results, run_dir = run(
        simulation_harness, out, strategy="papa", **{"papa-every": 1, "wire-dtype": "bfloat16"}
    )
    cfg = results.config
    tensors = list(new_model(cfg).parameters())
    params = sum(p.numel() for p in tensors)
    ledger = Ledger.read_csv(run_dir / "ledger.csv")
    train = [
        e for e in ledger.entries if e.phase == "train" and (e.round, e.direction) != (1, "down")
    ]
    limit = FRAMING + FRAMING_PER_ARRAY * len(tensors)
    assert len(train) == 2 * MEMBERS  # each member's weights up in round 1, the mean down in 2
    assert all(0 < e.bytes - 2 * params < limit for e in train), train
    # the last round's replies are the members' models, for the final step: no mean
    assert [r.exchange for r in results.rounds] == [{"averaged": MEMBERS}, {}]


@pytest.fixture
def torch_settings() -> Iterator[None]:
    """The population trainer sets process-wide torch options (deterministic=true); put
    them back for the tests that follow."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.usefixtures("torch_settings")
@pytest.mark.parametrize(
    "overrides",
    [
        {
            "strategy": "wash",
            "shuffle-optimizer-state": True,
            "shuffle-prob": 0.3,
            "wire-dtype": "bfloat16",
            "final-dtype": "float16",
        },
        {"strategy": "wash", "wire-dtype": "int4", "final-dtype": "int8"},
        {"strategy": "papa", "papa-every": 2},
    ],
    ids=["wash+opt-bfloat16-final-float16", "wash-int4-final-int8", "papa"],
)
def test_a_federated_run_equals_the_population_trainer_bit_for_bit(
    simulation_harness: FlowerHarness, out: Path, overrides: dict[str, ConfigValue]
) -> None:
    """Same config, three rounds: the members collected through Flower are the population
    trainer's members, bit for bit, every exchange delivered the same values, and the final
    step built the same soup (as sent in final-dtype, recalibrated with the members'
    statistics) and accuracies."""
    common = {"num-server-rounds": 3, "save-members": True, "deterministic": True}
    _, results, run_dir = run(simulation_harness, out, **common, **overrides)
    cfg = results.config
    reference = run_population(cfg, log=lambda _: None, progress_eval=False)
    federated = _members(run_dir)
    for i, (members, theirs) in enumerate(
        zip(reference.member_state_dicts, federated, strict=True)
    ):
        ours = final_format(cfg).through(members)  # as they were collected
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), f"member {i}: {key}"
    assert [r.exchange_digest for r in results.rounds] == [
        r.exchange_digest for r in reference.results.rounds
    ]
    assert [r.exchange for r in results.rounds] == [r.exchange for r in reference.results.rounds]
    moved = [r.exchange.get("moved", r.exchange.get("averaged")) for r in results.rounds]
    assert any(moved), "nothing was exchanged: the comparison proves nothing"
    final = torch.load(run_dir / "final_model.pt")["state_dict"]
    assert final.keys() == reference.final_state_dict.keys()
    assert all(torch.equal(final[k], reference.final_state_dict[k]) for k in final), "another soup"
    same = ("members", "ensemble", "soups", "final_accuracy")
    assert {k: getattr(results.final_figures(), k) for k in same} == {
        k: getattr(reference.results.final_figures(), k) for k in same
    }


def _members(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    flat = torch.load(run_dir / "members.pt")["state_dict"]
    members: list[dict[str, torch.Tensor]] = [{} for _ in range(MEMBERS)]
    for key, value in flat.items():
        index, name = key.split(".", 1)
        members[int(index)][name] = value
    return members


def test_bad_config_fails_before_training_with_a_clear_error(
    simulation_harness: FlowerHarness, out: Path
) -> None:
    """The ServerApp's own check (every key's, unit-tested in test_config.py), for users of
    plain ``flwr run``."""
    config = {**SMALL, "output-dir": str(out / "bad"), "shuffle-prob": 1.5}
    result = simulation_harness.run(config, federation_config=FEDERATION)
    assert result.status == "finished:failed"
    assert "shuffle-prob must be in [0.0, 1.0], got 1.5" in result.output + result.details
    assert not (out / "bad").exists()


def test_a_run_that_diverges_ends_failed_and_says_why(
    simulation_harness: FlowerHarness, out: Path
) -> None:
    """Every member's loss becomes NaN: they all fail, and the run does not pass for done."""
    target = out / "diverged"
    result = simulation_harness.run(
        {**SMALL, "output-dir": str(target), "lr": 1e12}, federation_config=FEDERATION
    )
    assert result.status == "finished:failed", result.output[-3000:]
    (run_dir,) = target.glob(f"*-{result.run_id}")
    results = read_results(run_dir)
    assert results.status == "failed"
    assert "no member completed a single round" in results.error
    assert "member 0: training loss became nan" in results.error
    for row in results.rounds:  # each failure with its reason, in one line
        assert len(row.failed) == MEMBERS and row.members == {}
        assert all("\n" not in why and "became nan" in why for why in row.failed.values())


def test_a_busy_metrics_port_fails_the_run_and_says_so(
    simulation_harness: FlowerHarness, out: Path
) -> None:
    target = out / "busy"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = {**SMALL, "output-dir": str(target), "metrics-port": taken.getsockname()[1]}
        result = simulation_harness.run(config, federation_config=FEDERATION)
    assert result.status == "finished:failed", result.output[-3000:]
    (run_dir,) = target.glob(f"*-{result.run_id}")
    results = read_results(run_dir)
    assert results.status == "failed" and "Address already in use" in results.error


def test_members_run_the_code_of_the_submitted_app(
    simulation_harness: FlowerHarness, out: Path, tmp_path: Path
) -> None:
    """An app submitted from another folder runs its own packages on the members, not the
    ones this checkout (installed editable) holds: each marks the file it was loaded from."""
    app = copy_app(tmp_path / "app")
    mark = "\nimport pathlib as _p\n_p.Path(__file__).with_suffix('.loaded').touch()\n"
    for module in ("client/app.py", "client/task.py", "wash_fed/training.py"):
        with open(app / module, "a") as source:
            source.write(mark)
    config = {**SMALL, "num-server-rounds": 1, "output-dir": str(out / "copy")}
    result = simulation_harness.run(config, federation_config=FEDERATION, app=app)
    assert result.status == "finished:completed", result.output[-3000:]
    loaded = {
        p.relative_to(p.parents[1]).as_posix() for p in simulation_harness.home.rglob("*.loaded")
    }
    assert loaded == {"client/app.loaded", "client/task.loaded", "wash_fed/training.loaded"}
    assert not list(PROJECT.rglob("*.loaded")), "this checkout's code ran"


def test_the_launcher_exits_non_zero_unless_the_run_completed(
    simulation_harness: FlowerHarness,
    out: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`make run`'s command: bad keys and values are named before anything starts, and a
    run that fails (here: no data set where the run looks for it) is an exit code of 1."""
    for key, value in simulation_harness.env.items():
        monkeypatch.setenv(key, value)
    assert launch_main(["test", "--run-config", "lr=inf"]) == 2
    assert "lr must be finite, got inf" in capsys.readouterr().err
    assert launch_main(["test", "--run-config", "shufle-prob=0.1"]) == 2
    assert "unknown config key 'shufle-prob'" in capsys.readouterr().err
    overrides = run_config_arg({**SMALL, "output-dir": str(out), "data-root": str(tmp_path)})
    code = launch_main(["test", "--run-config", overrides, "--federation-config", FEDERATION])
    assert code == 1
    assert "finished:failed" in capsys.readouterr().err


def test_comparison_command_runs_strategies_and_writes_table_and_plots(
    simulation_harness: FlowerHarness, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulations import compare

    for key, value in simulation_harness.env.items():
        monkeypatch.setenv(key, value)
    target = out / "compare"
    overrides = " ".join(f"{k}={v}" for k, v in SMALL.items() if k != "num-members")
    code = compare.main(
        [
            "--strategies", "wash,fedavg",
            "--num-supernodes", str(MEMBERS),
            "--run-config", overrides,
            "--superlink", "test",
            "--out", str(target),
        ]
    )  # fmt: skip
    assert code == 0
    table = (target / "comparison.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| wash |") and table[3].startswith("| fedavg |")
    # Columns: ..., sent while training (MB), sent in all (MB), all / FedAvg's all, ...
    wash, fedavg = ([float(cell) for cell in row.split("|")[6:9]] for row in table[2:4])
    assert 0 < wash[0] < 0.2 * fedavg[0]  # while training WASH sends a fraction of the models
    assert fedavg[2] == 1.0 and wash[2] == pytest.approx(wash[1] / fedavg[1], abs=1e-3)
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_round.png"):
        assert (target / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
