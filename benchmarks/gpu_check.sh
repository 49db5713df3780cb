#!/usr/bin/env bash
# GPU readiness in one go, at most 10 minutes on one GPU (each step has its own limit).
# Prints what it checked:
#   1. the CUDA-marked tests (a member trains on CUDA; a shuffle event on CUDA equals the
#      CPU one bit for bit; the member worker keeps its member on the GPU in one process);
#   2. a `flwr run` simulation with four members sharing the GPU (client-resources-num-gpus
#      0.25), when Ray is installed;
#   3. the deployment overhead benchmark on the GPU: ResNet-18 with a process per message
#      and with the member worker, the CNN with the worker. A runtime that does not finish
#      prints its SuperLink, SuperNode and member-worker logs (each worker logs when its
#      member is ready, on which device, and every message it handled).
# Steps 2 and 3 sample the GPU every 0.5 s (nvidia-smi): how busy it was, its peak memory,
# and the memory still in use 2 s after the step ended (released, or held by a leftover).
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
# sampled NAME COMMAND...: runs COMMAND while nvidia-smi samples the GPU; prints one line.
sampled() {
  local name=$1 samples sampler rc after
  shift
  samples=$(mktemp)
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits \
    -lms 500 > "$samples" 2>/dev/null &
  sampler=$!
  "$@"
  rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  sleep 2
  after=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
  awk -F', ' -v name="$name" -v after="$after" '
    { busy += $1; n++; if ($2 > peak) peak = $2 }
    END { if (n) printf "GPU during %s: busy %.0f%% (mean of %d samples), peak %d MiB, %s MiB in use 2 s after\n", name, busy / n, n, peak, after }' "$samples"
  return "$rc"
}

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" -c "import torch, flwr; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count(), '| flwr', flwr.__version__)" || exit 1

step "1. CUDA-marked tests"
timeout 90 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/e2e/test_cuda.py -rs || failed=1

step "2. flwr run simulation, four members on one GPU"
if "$PY" -c "import ray" 2>/dev/null; then
  data=$(mktemp -d)
  "$PY" -m wash_fed.data synthetic cifar10 --root "$data"
  sampled "the simulation" timeout 120 "$PY" - "$data" <<'PY' || failed=1
import json, sys
from pathlib import Path
from deploy.processes import TINY_RUN, FlowerHarness
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

step "3. deployment overhead on the GPU, each runtime in its own limit"
for row in "resnet18|process per message|120" "resnet18|worker|120" "cnn|worker|90"; do
  IFS='|' read -r model runtime limit <<< "$row"
  sampled "$model, $runtime" timeout -s INT "$limit" "$PY" benchmarks/deployment_overhead.py \
    --models "$model" --runtimes "$runtime" --rounds 3 || failed=1
done

echo; [ "$failed" = 0 ] && echo "GPU check: all steps passed" || echo "GPU check: a step FAILED"
exit "$failed"
