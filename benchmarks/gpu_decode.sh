#!/usr/bin/env bash
# The decoding benchmark (benchmarks/bench_decode.py: plain / prefix / dual cache, confidence, threshold 0.7/0.8/0.9,
# threshold 0.9 + dual, dual with 2 / 4 tokens per step; SM on and off; tokens/s, NFE, positions, gen-PPL, whitespace
# and top-token shares) on one H100/H200 in <= 10 min, for the
# small flavor and, when given, Qwen2.5-Coder-0.5B. Each model's JSON goes to $OUT/decode_<name>.json; one JSON line
# at the end lists them. Before them, benchmarks/window_cost.py on the device: what a 32-position window of the dual
# cache costs against the full forward, per flavor, at 1 and 16 rows ($OUT/window_cost.json); after the small flavor,
# when the experiment's binary cells exist (CELLS, default artifacts/experiments/gpu/cells), the SM-vs-binary threshold
# curve over its seeds, random and confidence order (benchmarks/threshold_curve.py: $OUT/threshold_curve.json + .png).
#   bash benchmarks/gpu_decode.sh          # EXPORT: an SM model of benchmarks/gpu_experiment.sh (small flavor, GPT-2
#                                          # BPE); TOKENIZER: gpt2; lengths 128 256 512, 32 samples each
#   QWEN=<softmask checkpoint written by `softmask hf-import --source qwen2.5-coder-0.5b-instruct`> bash ...
#                                          # adds the HF backbone (its own tokenizer), lengths 128 256, 8 samples
#   TOY=1 bash benchmarks/gpu_decode.sh    # CPU smoke run: a random debug-flavor model, length 64, 2 samples
# The weights must already be on the machine (nothing is downloaded); the evaluator LM is the packaged SmolLM2.
# For HumanEval with the same decoding variants see DECODE= in benchmarks/gpu_finetune_code.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_decode}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONWARNINGS=ignore::FutureWarning,ignore::DeprecationWarning
mkdir -p "$OUT"
t0=$(date +%s)
written=()
if [[ "${TOY:-0}" == "1" ]]; then
  EXPORT="$OUT/toy_export"
  "$PY" - "$EXPORT" <<'PY'
import sys
import models
from models.tokenizer import load_tokenizer
tok = load_tokenizer("gpt2")
cfg = models.ModelConfig.from_flavor("debug", vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, max_seq_len=64,
                                     n_layers=2)
models.save_pretrained(models.build_model(cfg), sys.argv[1])
PY
  timeout 120 "$PY" benchmarks/window_cost.py --flavors debug --batches 1 2 --length 64 --block 16 --repeats 1 \
    > "$OUT/window_cost.json"
  written+=("$OUT/window_cost.json")
  timeout 300 "$PY" benchmarks/bench_decode.py --checkpoint "$EXPORT" --tokenizer gpt2 --lengths 64 --samples 2 \
    --block 16 --settings plain dual dual-x2 thr0.9 --device cpu --ppl-context 32 > "$OUT/decode_toy.json"
  written+=("$OUT/decode_toy.json")
  timeout 300 "$PY" benchmarks/threshold_curve.py --arm "sm=$EXPORT" --arm "binary=$EXPORT" --tokenizer gpt2 \
    --length 32 --block 16 --samples 2 --thresholds 0.9 --parallel 4 --device cpu --ppl-context 32 \
    --plot "$OUT/threshold_curve.png" > "$OUT/threshold_curve.json"
  written+=("$OUT/threshold_curve.json")
else
  EXPORT=${EXPORT:-artifacts/experiments/gpu/cells/sm-continued-s0/export}
  [[ -f "$EXPORT/config.json" ]] || { echo "gpu_decode.sh: no export at $EXPORT (run benchmarks/gpu_experiment.sh" \
                                            "first, or set EXPORT=<dir> TOKENIZER=<its tokenizer>)" >&2; exit 2; }
  timeout 90 "$PY" benchmarks/window_cost.py --device cuda --flavors debug tiny small --batches 1 16 --repeats 10 \
    > "$OUT/window_cost.json"
  written+=("$OUT/window_cost.json")
  timeout 420 "$PY" benchmarks/bench_decode.py --checkpoint "$EXPORT" --tokenizer "${TOKENIZER:-gpt2}" \
    --lengths 128 256 512 --samples "${SAMPLES:-32}" --threads 0 --device cuda > "$OUT/decode_small.json"
  written+=("$OUT/decode_small.json")
  CELLS=${CELLS:-artifacts/experiments/gpu/cells}
  sm=() bin=()
  for s in 0 1 2; do
    [[ -f "$CELLS/sm-continued-s$s/export/config.json" ]] && sm+=("$CELLS/sm-continued-s$s/export")
    [[ -f "$CELLS/binary-continued-s$s/export/config.json" ]] && bin+=("$CELLS/binary-continued-s$s/export")
  done
  if (( ${#sm[@]} && ${#bin[@]} )); then
    timeout 180 "$PY" benchmarks/threshold_curve.py --arm "sm=$(IFS=,; echo "${sm[*]}")" \
      --arm "binary=$(IFS=,; echo "${bin[*]}")" --tokenizer "${TOKENIZER:-gpt2}" --length 256 --samples 32 \
      --threads 0 --device cuda --plot "$OUT/threshold_curve.png" > "$OUT/threshold_curve.json"
    written+=("$OUT/threshold_curve.json")
  fi
  if [[ -n "${QWEN:-}" ]]; then
    timeout 150 "$PY" benchmarks/bench_decode.py --checkpoint "$QWEN" --tokenizer "$QWEN" --lengths 128 256 \
      --samples 8 --threads 0 --device cuda --settings plain prefix dual thr0.9 thr0.9+dual > "$OUT/decode_qwen.json"
    written+=("$OUT/decode_qwen.json")
  fi
fi
printf '{"script": "gpu_decode.sh", "toy": %s, "wall_s": %s, "results": [%s]}\n' "${TOY:-0}" "$(( $(date +%s) - t0 ))" \
  "$(printf '"%s",' "${written[@]}" | sed 's/,$//')"
