#!/usr/bin/env bash
# The README's frontier sweeps and long-training runs on one GPU, all at once: one process
# per (partition, seed) of `simulations.frontier` and one per variant of
# `simulations.long_training`, each cut off after LIMIT seconds (default 480). Results go
# under OUT (default runs/gpu): the sweeps' runs.jsonl rows as each run finishes (rerunning
# continues them), the long runs' rows as each ends, and one log per process.
#
#   benchmarks/gpu_frontier.sh                  # on the GPU machine, carrying .whl and data/gpu
#   SCALE=tiny benchmarks/gpu_frontier.sh       # a one-minute check of the script, any machine
#
# Data: Fashion-MNIST's four .gz files in data/gpu/FashionMNIST/raw/ (from Debian's
# dataset-fashion-mnist; 30 MB to carry), unpacked into $WASH_FED_DATA (default
# /tmp/wash-fed-data). Afterwards, on any machine,
#   cat OUT/frontier-full-s*/runs.jsonl > runs/frontier-full/runs.jsonl
#   python -m simulations.frontier --partition full     # finds every run done: table, plot
# and likewise cat OUT/long-*/runs.jsonl for python -m simulations.long_training.
# DONE=<folder> (carried) holds rows already run elsewhere, as frontier-<partition>/runs.jsonl
# and long-training/runs.jsonl: each process starts from its share of them and runs only
# what is missing, and the cat above then gives every row once.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ] && ! "$PY" -c "import flwr" 2>/dev/null; then  # as in benchmarks/gpu_check.sh
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/wash-fed-site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/wash-fed-site:$PWD"
fi
OUT=${OUT:-runs/gpu}
LIMIT=${LIMIT:-480}
export WASH_FED_DATA=${WASH_FED_DATA:-/tmp/wash-fed-data}
mkdir -p "$WASH_FED_DATA/FashionMNIST/raw"
for gz in data/gpu/FashionMNIST/raw/*.gz; do
  gunzip -c "$gz" >"$WASH_FED_DATA/FashionMNIST/raw/$(basename "$gz" .gz)" || exit 1
done
# Decoded once here, so that the processes below only read it.
"$PY" -m wash_fed.data prepare fashion-mnist --root "$WASH_FED_DATA" || exit 1
mkdir -p "$OUT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ "${SCALE:-full}" = tiny ]; then
  sweep=(--total-steps 20 --points "fedavg-r1,wash-p0.05-r10"
    --set "train-subset=600 holdout-size=0 test-subset=300 batch-size=32")
  long=(--epochs 1 --set "train-subset=600 holdout-size=0 test-subset=300 batch-size=32")
  seeds=(0 1)
else
  sweep=()
  long=(--epochs 15)
  seeds=(0 1 2)
fi

prefill() {  # store in DONE, key, value, destination: the store's rows whose key is value
  [ -n "${DONE:-}" ] && [ -f "$DONE/$1" ] || return 0
  mkdir -p "$(dirname "$4")"
  "$PY" -c 'import json, sys
src, key, value, dst = sys.argv[1:]
rows = [line for line in open(src) if line.strip() and str(json.loads(line)[key]) == value]
open(dst, "w").writelines(rows)' "$DONE/$1" "$2" "$3" "$4" || exit 1
}

started=()
launch() {  # name, command...: run it in the background, cut off after LIMIT seconds
  local name=$1
  shift
  timeout -s INT "$LIMIT" "$@" >"$OUT/$name.log" 2>&1 &
  started+=("$!:$name")
}
for partition in full dirichlet; do
  for seed in "${seeds[@]}"; do
    prefill "frontier-$partition/runs.jsonl" seed "$seed" "$OUT/frontier-$partition-s$seed/runs.jsonl"
    launch "frontier-$partition-s$seed" "$PY" -m simulations.frontier --partition "$partition" \
      --alpha 0.3 --seeds "$seed" --out "$OUT/frontier-$partition-s$seed" "${sweep[@]}"
  done
done
for variant in $("$PY" -c "from simulations.long_training import VARIANTS as V
print(' '.join(v.name for v in V))"); do
  prefill long-training/runs.jsonl point "$variant" "$OUT/long-$variant/runs.jsonl"
  launch "long-$variant" "$PY" -m simulations.long_training --variants "$variant" \
    --out "$OUT/long-$variant" "${long[@]}"
done

failed=0
for entry in "${started[@]}"; do
  pid=${entry%%:*} name=${entry#*:}
  if wait "$pid"; then status="finished"; else status="FAILED (exit $?)"; failed=1; fi
  echo "$name: $status; $(tail -n 1 "$OUT/$name.log")"
done
exit "$failed"
