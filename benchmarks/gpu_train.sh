#!/usr/bin/env bash
# One-GPU training benchmark (H100/H200): DeepSpeed ZeRO-2, bf16, the paper's small (~169M) flavor, seq 1024,
# soft-masking objective (p_sm 0.8). Prints JSON with tokens/s and MFU over the peak bf16 FLOP/s (989 TFLOP/s dense
# for H100/H200 SXM) two ways: "mfu_palm" by the PaLM convention (6 x non-embedding parameters + attention, the output
# layer on the masked rows where it runs) and "mfu_6N" (6 x all parameters); "_with_pass1" also counts the no-grad
# first pass of two-pass steps (benchmarks/bench_train.py).
# Finishes in well under 5 minutes (model build + ~3 warmup + 30 timed steps).
#   bash benchmarks/gpu_train.sh                      # GPU defaults
#   bash benchmarks/gpu_train.sh --compile            # torch.compile each transformer block
#   bash benchmarks/gpu_train.sh --objective binary   # the MDLM baseline step, for the SM overhead
#   BACKBONE=dit bash benchmarks/gpu_train.sh         # MDLM's DiT (models.dit, small = MDLM OWT's 169.6M) instead
#   TOY=1 bash benchmarks/gpu_train.sh                # CPU smoke test at toy size (debug flavor, seq 64)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUNDLE=${BUNDLE:-/tmp/bundle}  # DeepSpeed wheels from `benchmarks/offline_bundle.py train` (docs/offline_gpu_install.md)
[[ -d "$BUNDLE/site" ]] && export PYTHONPATH="$BUNDLE/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore::FutureWarning,ignore::DeprecationWarning
if [[ "${TOY:-0}" == "1" ]]; then
  export DS_ACCELERATOR=cpu
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}  # DeepSpeed's CPU op, built by make install
  exec timeout 600 "$PY" benchmarks/bench_train.py --only gpu --backbone "${BACKBONE:-core}" --flavor debug \
    --seq-len 64 --micro 2 --steps 3 --warmup 1 --device-name "${DEVICE_NAME:-H100 (toy run on CPU: MFU meaningless)}" "$@"
fi
export DS_ACCELERATOR=cuda
exec timeout 300 "$PY" benchmarks/bench_train.py --only gpu --backbone "${BACKBONE:-core}" --flavor "${FLAVOR:-small}" \
  --seq-len "${SEQ_LEN:-1024}" \
  --micro "${MICRO:-16}" --steps "${STEPS:-30}" --warmup "${WARMUP:-3}" "$@"
