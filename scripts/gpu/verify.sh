#!/usr/bin/env bash
# GPU verification and benchmark phases, run on the device machine after the staging calls of
# scripts/gpu/README.md (the full dev CSV is carried in .stage2 and lands in /tmp/stage):
#
#   . scripts/gpu/remote_setup.sh || exit 1; bash scripts/gpu/verify.sh tests train
#
# Each phase logs to $OUT/<phase>.log and copies its JSON results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATA=${DATA:-/tmp/stage/sentiment_dev.csv}
[ -f "$DATA" ] || DATA=data/demo/sentiment_demo.csv
RUNS=/tmp/runs; mkdir -p "$RUNS"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

phase() {
  local name=$1; shift
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-15}" "$OUT/$name.log"
  return 0
}

tiny_model() { [ -f /tmp/tiny/config.json ] || python tests/tiny_model.py /tmp/tiny >/dev/null; }

for p in "$@"; do
  case $p in
    tests)   phase gpu-tests python -m pytest -q -p no:cacheprovider --timeout 540 -rA tests/gpu ;;
    train)   tiny_model
             phase train-tiny python jobs/train.py --config demo model.name=/tmp/tiny run.name=tiny \
               run.storage_path=$RUNS train.max_steps=20 model.max_seq_length=256
             phase train-demo python jobs/train.py --config demo run.storage_path=$RUNS
             for r in tiny demo; do cp "$RUNS/$r/metrics.json" "$OUT/train-$r-metrics.json" 2>/dev/null; done ;;
    bench-train-demo) phase bench-train-demo python jobs/benchmark.py train --model smollm2-135m-instruct --data "$DATA" --out "$OUT/bench-train-demo" ;;
    bench-train-8b)   phase bench-train-8b python jobs/benchmark.py train --model llama8b-shape --data "$DATA" --out "$OUT/bench-train-8b" ;;
    # Unsloth's gradient checkpointing (the presets') against none, same machine, back to back.
    bench-train-8b-gc) for gc in unsloth false; do
               phase bench-train-8b-gc-$gc python jobs/benchmark.py train --model llama8b-shape --backends unsloth \
                 --data "$DATA" --out "$OUT/bench-train-8b-gc-$gc" lora.gradient_checkpointing=$gc
             done ;;
    bench-label-demo) phase bench-label-demo python jobs/benchmark.py label --model smollm2-135m-instruct --data "$DATA" --out "$OUT/bench-label-demo" ;;
    bench-label-8b)   phase bench-label-8b python jobs/benchmark.py label --model llama8b-shape --data "$DATA" --out "$OUT/bench-label-8b" ;;
    label-8b) phase label-8b python jobs/label.py --config demo --input "$DATA" --output /tmp/label-8b --overwrite \
               model.name=$(ls -d $SENTIMENT_RAY_CACHE/bench-shapes/llama8b-shape-* | head -1) label.batch_size=${LABEL_BATCH:-128} ;;
    label-demo) phase label-demo python jobs/label.py --config demo --input "$DATA" --output /tmp/label-demo --overwrite \
               --adapter "$RUNS/demo/adapter" label.batch_size=${LABEL_BATCH:-128} ;;
    tune)    UNSLOTH_COMPILE_DISABLE=1 phase tune python jobs/tune.py --config demo tune.num_samples=2 run.storage_path=$RUNS
             find "$RUNS" -name trials.csv -exec cp {} "$OUT/tune-trials.csv" \; ;;
    shape-8b) phase shape-8b python -m sentiment_ray.bench.shapes --model llama8b-shape --tokenizer smollm2-135m-instruct ;;
    # Weak scaling (issue 6): SCALE_ROWS dev rows per actor, ACTORS="1 2 4" GPU actors.
    label-scale) mkdir -p /tmp/scale; python scripts/gpu/scale_data.py "$DATA" /tmp/scale ${SCALE_ROWS:-20000} ${ACTORS:-1 2 4}
             for n in ${ACTORS:-1 2 4}; do
               phase label-scale-$n python jobs/label.py --config demo --input /tmp/scale/rows-$n.csv \
                 --output /tmp/label-scale-$n --overwrite --rows-per-unit ${UNIT_ROWS:-2500} label.num_actors=$n model.max_seq_length=512 \
                 model.name=$(ls -d $SENTIMENT_RAY_CACHE/bench-shapes/llama8b-shape-* | head -1) label.batch_size=1024
               cp /tmp/label-scale-$n/summary.json "$OUT/label-scale-$n-summary.json"
               tar czf "$OUT/label-scale-$n-done.tgz" -C /tmp label-scale-$n/_done  # per-unit markers: actor timelines
             done ;;
    # Concurrent trials, one per GPU (issues 4 and 6), with GPU utilisation sampled every second.
    tune-multi) nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -lms 1000 > "$OUT/tune-gpu-util.csv" &
             smi=$!
             UNSLOTH_COMPILE_DISABLE=1 phase tune-multi python jobs/tune.py --config demo tune.num_samples=${TRIALS:-4} \
               tune.scheduler=fifo tune.experiment_name=tune-multi run.storage_path=$RUNS
             kill $smi
             mkdir -p "$OUT/tune-multi"; find "$RUNS/tune-multi" -maxdepth 2 -type f -size -2M \( -name "*.csv" -o -name "*.json" -o -name "*.jsonl" \) \
               | while read f; do cp "$f" "$OUT/tune-multi/$(echo "${f#$RUNS/tune-multi/}" | tr / _)"; done ;;
    *) echo "unknown phase $p"; exit 2 ;;
  esac
done
