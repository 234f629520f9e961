#!/usr/bin/env bash
# The measurement call (last of the sequence in scripts/gpu/README.md): joins the staged demo
# model (remote_setup.sh), then times Unsloth training variants with probe_unsloth_steps.py.
# Writes $OUT/probe_*.log and $OUT/probe.jsonl. Sized to end inside one 600 s call.
. scripts/gpu/remote_setup.sh || exit 1
OUT=${OUT:-/tmp/probe_out}; mkdir -p "$OUT"
set -o pipefail
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
STEPS=${STEPS:-12}
# Process A, Unsloth defaults: the variants that need no env var, most important first.
timeout "${A_TIMEOUT:-400}" python3 scripts/gpu/probe_unsloth_steps.py \
  --variants "${A_VARIANTS:-auto+prof,fixed,nogc,pad64,packed}" --steps "$STEPS" --profile-step 6 \
  --variant-max-s 70 --deadline-s "${A_DEADLINE:-300}" --out "$OUT/probe.jsonl" 2>&1 \
  | tee "$OUT/probe_A.log" | grep -E "^\[|SUMMARY|Error|error|PROFILE SUMMARY|Unsloth:" | cut -c1-400
# Process B, Unsloth's compiler off (read at import, so its own process).
left=$(( ${CALL_BUDGET_S:-560} - SECONDS ))
if [ "$left" -gt 120 ]; then
  UNSLOTH_COMPILE_DISABLE=1 timeout "$left" python3 scripts/gpu/probe_unsloth_steps.py \
    --variants "${B_VARIANTS:-auto,fixed}" --steps "$STEPS" --variant-max-s 50 \
    --deadline-s $(( left - 70 )) --out "$OUT/probe.jsonl" 2>&1 \
    | tee "$OUT/probe_B.log" | grep -E "^\[|SUMMARY|Error|error|Unsloth:" | cut -c1-400
else
  echo "run_probe: ${left}s left, skipping process B (UNSLOTH_COMPILE_DISABLE=1)"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
