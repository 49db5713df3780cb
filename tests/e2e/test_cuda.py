"""On a GPU (``pytest -m cuda``; skipped where torch sees none): a member trains on CUDA, a
shuffle event on CUDA equals the CPU one bit for bit, and the member worker keeps its
member on the GPU in one process -- one CUDA context per run, not per round. The data are
synthetic: GPU machines need not hold the real data sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.test_worker import HELLO, proxy, train
from wash_fed.config import ConfigValue, WashFedConfig
from wash_fed.data import write_synthetic
from wash_fed.keys import Metric
from wash_fed.models import build_model
from wash_fed.shuffle import event_mask, layer_probs, shuffle_population
from wash_fed.training import Member, load_training_data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
]

SYNTHETIC: dict[str, ConfigValue] = {
    "dataset": "cifar10",
    "num-members": 2,
    "batch-size": 32,
    "train-subset": 0,
    "holdout-size": 0,
    "num-server-rounds": 4,
    "local-steps": 3,
}


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    write_synthetic("cifar10", tmp_path / "data", train=400, test=100)
    return tmp_path / "data"


def test_a_member_trains_on_cuda(data_root: Path) -> None:
    cfg = WashFedConfig.from_mapping({**SYNTHETIC, "data-root": str(data_root)})
    member = Member(cfg, 0, load_training_data(cfg).member(0), torch.device("cuda"))
    stats = member.train_steps(3)
    assert all(p.is_cuda for p in member.parameters())
    assert stats.steps == 3 and torch.isfinite(torch.tensor(stats.loss))


def test_a_shuffle_event_on_cuda_equals_the_cpu_one_bit_for_bit() -> None:
    torch.manual_seed(0)
    models = [build_model("resnet18", 10, 3, (32, 32)) for _ in range(4)]
    numels = [p.numel() for p in models[0].parameters()]
    mask = event_mask(numels, layer_probs(0.1, len(numels), "linear"), seed=3, event=5)
    cpu = [[p.detach().clone() for p in m.parameters()] for m in models]
    gpu = [[p.detach().cuda() for p in m.parameters()] for m in models]
    for population in (cpu, gpu):
        shuffle_population([{"weights": ts} for ts in population], mask, seed=3, event=5)
    for on_cpu, on_gpu in zip(cpu, gpu, strict=True):
        assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_gpu, strict=True))
    assert not all(torch.equal(a, p) for a, p in zip(cpu[0], models[0].parameters(), strict=True))


def test_the_worker_keeps_its_member_on_the_gpu_in_one_process(
    tmp_path: Path, data_root: Path
) -> None:
    config: dict[str, ConfigValue] = {
        **SYNTHETIC,
        "num-members": 1,
        "data-root": str(data_root),
        "device": "cuda",
    }
    result = proxy(tmp_path / "w", [HELLO, train(1), train(2), train(3)], run_config=config)
    assert result["torch"] is False  # the ClientApp side holds no CUDA context
    hello, *rounds = (r["metrics"] for r in result["replies"])
    assert result["replies"][0]["info"]["device"].startswith("cuda")
    assert {r[Metric.WORKER_PID] for r in rounds} == {hello[Metric.WORKER_PID]}
    assert all(r[Metric.RESTORE_SECONDS] == 0.0 for r in rounds)
