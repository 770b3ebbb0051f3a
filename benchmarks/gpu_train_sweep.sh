#!/usr/bin/env bash
# Several one-GPU training configurations in a row (benchmarks/gpu_train.sh each), every one in its own process, so
# a crash or a timeout costs its own line only. One JSON object per line in $RESULT (default $OUT/train_sweep.jsonl,
# $OUT being where results are kept; else /tmp), stderr of all runs in the matching .err file.
# Stops starting new runs once BUDGET_S seconds have passed (a bound on the GPU time one sweep takes).
#   bash benchmarks/gpu_train_sweep.sh                   # the default list below, on the GPU
#   SWEEP="sm:16:--compile bin:16:--compile --objective binary" bash benchmarks/gpu_train_sweep.sh
#   TOY=1 bash benchmarks/gpu_train_sweep.sh             # the same runs at toy size on CPU
# Each entry is name:micro_batch:flags (flags pass on to bench_train.py; spaces inside an entry are written as ',').
set -uo pipefail
cd "$(dirname "$0")/.."
RESULT=${RESULT:-${OUT:-/tmp}/train_sweep.jsonl}
ERR=${RESULT%.jsonl}.err
BUDGET_S=${BUDGET_S:-300}
PER_RUN_S=${PER_RUN_S:-120}
# default: the two best configurations of the first H200 sweep (binary and SM at micro-batch 64), each without and
# with the compiled loss, then the default settings (the AdamW is fused on CUDA by default; the last entry measures
# the foreach one). On one H200 (2026-11-28): 44.6 % MFU by 6N, 33.9 % by the PaLM convention, for bin-m64-closs
# (docs/benchmarks.md)
SWEEP=${SWEEP:-"bin-m64:64:--compile,--objective,binary,--no-overflow-check \
bin-m64-closs:64:--compile,--compile-loss,--objective,binary,--no-overflow-check \
sm-m64:64:--compile,--no-overflow-check sm-m64-closs:64:--compile,--compile-loss,--no-overflow-check \
sm-m16-default:16:--compile bin-m64-closs-foreach:64:--compile,--compile-loss,--objective,binary,--no-overflow-check,--fused-adam,off"}
: >"$RESULT"
: >"$ERR"
start=$SECONDS
for entry in $SWEEP; do
  IFS=: read -r name micro flags <<<"$entry"
  if (( SECONDS - start > BUDGET_S )); then
    echo "{\"name\": \"$name\", \"skipped\": \"sweep budget of ${BUDGET_S}s spent\"}" >>"$RESULT"
    continue
  fi
  t0=$SECONDS
  echo "== $name (micro $micro, flags ${flags//,/ })" >>"$ERR"
  # shellcheck disable=SC2086  # flags split on purpose
  if out=$(MICRO=$micro timeout "$PER_RUN_S" bash benchmarks/gpu_train.sh ${flags//,/ } 2>>"$ERR"); then
    python3 - "$name" "$((SECONDS - t0))" "$out" >>"$RESULT" <<'EOF'
import json, sys
gpu = json.loads(sys.argv[3])["gpu"]
print(json.dumps({"name": sys.argv[1], "wall_s": int(sys.argv[2]), **gpu}))
EOF
  else
    echo "{\"name\": \"$name\", \"failed\": true, \"wall_s\": $((SECONDS - t0))}" >>"$RESULT"
  fi
  tail -n 1 "$RESULT"
done
