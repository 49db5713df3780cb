#!/usr/bin/env bash
# GPU readiness in one go, at most 9.5 minutes on one GPU (each step has its own limit).
# Prints what it checked:
#   1. the CUDA-marked tests (a member trains on CUDA; a shuffle event on CUDA equals the
#      CPU one bit for bit; the member worker keeps its member on the GPU in one process);
#   2. a `flwr run` simulation with four members sharing the GPU (client-resources-num-gpus
#      0.25), when Ray is installed;
#   3. the deployment overhead benchmark (ResNet-18, process per message against the
#      member worker) on the GPU.
# Data are synthetic (random 32x32 images): a GPU machine need not hold the data sets.
#
#   benchmarks/gpu_check.sh                # where the project's environment is installed
#   benchmarks/gpu_wheels.sh && ...        # a machine with torch but no Flower: see there
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ]; then  # wheels carried by benchmarks/gpu_wheels.sh for what the machine lacks
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/wash-fed-site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/wash-fed-site:$PWD" PATH="/tmp/wash-fed-site/bin:$PATH"
fi
failed=0
step() { echo; echo "=== $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" -c "import torch, flwr; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count(), '| flwr', flwr.__version__)" || exit 1

step "1. CUDA-marked tests"
timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/e2e/test_cuda.py -rs || failed=1

step "2. flwr run simulation, four members on one GPU"
if "$PY" -c "import ray" 2>/dev/null; then
  data=$(mktemp -d)
  "$PY" -m wash_fed.data synthetic cifar10 --root "$data"
  timeout 150 "$PY" - "$data" <<'PY' || failed=1
import json, sys
from pathlib import Path
from simulations.local_flower import TINY_RUN, FlowerHarness
home = Path(sys.argv[1]) / "flwr"
harness = FlowerHarness(home)
try:
    harness.start_superlink(simulation=True)
    result = harness.run(
        {**TINY_RUN, "dataset": "cifar10", "model": "resnet18", "data-root": sys.argv[1],
         "train-subset": 0, "holdout-size": 0, "test-subset": 0, "device": "cuda",
         "output-dir": str(home / "runs")},
        federation_config="num-supernodes=4 client-resources-num-cpus=1 "
        "client-resources-num-gpus=0.25",
    )
    print("status:", result.status, result.details)
    (run_dir,) = (home / "runs").glob(f"*-{result.run_id}")
    rows = json.loads((run_dir / "results.json").read_text())["rounds"]
    print("round seconds:", [round(r["seconds"], 2) for r in rows])
    sys.exit(result.status != "finished:completed")
finally:
    harness.close()
PY
else
  echo "skipped: Ray is not installed here (flwr[simulation] needs it; its wheel is larger"
  echo "than what can be carried to the device machine)"
fi

step "3. deployment overhead on the GPU (ResNet-18), each runtime in its own 150 s"
for runtime in "process per message" worker; do
  timeout -s INT 150 "$PY" benchmarks/deployment_overhead.py --models resnet18 \
    --runtimes "$runtime" --rounds 3 || failed=1
done

echo; [ "$failed" = 0 ] && echo "GPU check: all steps passed" || echo "GPU check: a step FAILED"
exit "$failed"
