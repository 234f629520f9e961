"""What the benchmark parents and their child processes share: running a child, preparing
the model, the data, the config, environment facts, JSON and tables.

Light at import time (no torch): the parent process never imports unsloth or touches the
GPU itself; each measurement runs in a child process of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sentiment_ray.config import DataConfig, load_config
from sentiment_ray.errors import UserError
from sentiment_ray.io.readers import read_chunks
from sentiment_ray.io.storage import Storage
from sentiment_ray.label.plan import MIN_AUTO_ROWS
from sentiment_ray.labels import LabelSet
from sentiment_ray.train import data as train_data

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "llama31_8b_multilingual"  # the reference run: batch 2 x GA 4, 2048, packing
DEFAULT_DATA = "data/demo/sentiment_demo.csv"  # the committed demo sample, when --data is not given


class BenchError(UserError, RuntimeError):
    pass


# ----------------------------------------------------------------------------- files


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """A result file, atomically (a parent reading it never sees half of it). Not redacted
    like Storage.write_json: benchmark results hold no credentials, and NaN stays NaN."""
    path = Path(path).absolute()
    Storage(str(path.parent)).write_text(path.name, json.dumps(obj, indent=2, default=_json_default, allow_nan=True))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def default_data_path() -> str:
    path = REPO_ROOT / DEFAULT_DATA
    if not path.is_file():
        raise BenchError(f"no benchmark data at {path}; pass --data")
    return str(path)


def resolve_data_path(path: str | None) -> str:
    if not path:
        return default_data_path()
    if "://" in path or os.path.isabs(path):
        return path
    for root in (Path.cwd(), REPO_ROOT):
        if (root / path).exists():
            return str((root / path).resolve())
    raise BenchError(f"data file {path!r} not found (relative to {Path.cwd()} or {REPO_ROOT})")


def load_table(path: str, max_rows: int | None, seed: int, data_cfg=None, labels=None):
    """Validated rows of a labelled CSV/Parquet/JSONL (`sentence`, `label`, ...), at most
    `max_rows` of them (a stratified, seeded sample: the same rows for every backend)."""
    labelled = train_data.load_labelled(path, data_cfg or DataConfig(), labels or LabelSet(["Positive", "Negative"]))
    return train_data.stratified_subsample(labelled.table, max_rows, seed)


# ----------------------------------------------------------------------------- config


def base_config(config: str, overrides: Sequence[str]):
    """The preset (or YAML) the benchmark starts from, with dotted overrides applied."""
    return load_config(config, list(overrides))


# ----------------------------------------------------------------------------- children


def child_env() -> dict[str, str]:
    """The parent's environment with the repo on PYTHONPATH (after any existing entries:
    on the GPU machine /tmp/site comes first)."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        paths.append(str(REPO_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_child(module: str, args: Sequence[str], log_path: str | os.PathLike, timeout: float) -> dict[str, Any]:
    """Run `python -m module args...` with stdout+stderr into `log_path`. Returns
    {"returncode", "seconds", "timed_out", "log"}; never raises for a failed child."""
    return run_script(["-m", module, *args], log_path, timeout)


def log_tail(path: str | os.PathLike, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def prepare_model(name: str, tokenizer: str, cache_dir: str | None, out_dir: Path, timeout: float) -> dict[str, Any]:
    """{"path": local folder, ...} for `name`. A folder that exists is used as is; a shape
    or an alias is built/converted in a child process, so the GPU memory of a bf16 build is
    gone before anything is measured."""
    candidate = Path(name).expanduser()
    if (candidate / "config.json").is_file():
        return {"model": name, "path": str(candidate.resolve()), "seconds": 0.0}
    args = ["--model", name, "--tokenizer", tokenizer]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    run = run_child("sentiment_ray.bench.shapes", args, out_dir / f"prepare-{_slug(name)}.log", timeout)
    if run["returncode"] != 0:
        raise BenchError(f"preparing model {name!r} failed (rc {run['returncode']}):\n{log_tail(run['log'])}")
    for line in reversed(Path(run["log"]).read_text(encoding="utf-8").splitlines()):
        if line.startswith("{"):
            info = json.loads(line)
            info["seconds"] = run["seconds"]
            return info
    raise BenchError(f"preparing model {name!r} printed no result; see {run['log']}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(name.rstrip("/")) or name)


# ----------------------------------------------------------------------------- environment


def environment(device: Any = None) -> dict[str, Any]:
    """Package versions and the device (call in a child, after the backend's imports)."""
    from importlib import metadata

    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "bitsandbytes", "accelerate", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "versions": versions,
        "device": str(device) if device is not None else None,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            idx = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            info["gpu"] = {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
    except ImportError:
        pass
    return info


def cuda_available_without_context() -> bool:
    """Whether a CUDA GPU is visible, asked through NVML so the parent creates no CUDA
    context (the setting is not passed on to the children)."""
    try:
        import torch
    except ImportError:
        return False
    key = "PYTORCH_NVML_BASED_CUDA_CHECK"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        return bool(torch.cuda.is_available())
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def default_backends(smoke: bool) -> list[str]:
    if smoke or not cuda_available_without_context():
        return ["hf"]
    import importlib.util

    return ["unsloth", "hf"] if importlib.util.find_spec("unsloth") is not None else ["hf"]


# ----------------------------------------------------------------------------- numbers & tables


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ratio(a: Any, b: Any) -> float | None:
    return a / b if finite(a) and finite(b) and b != 0 else None


def summary_stats(values: Sequence[float]) -> dict[str, float | None]:
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"mean": None, "median": None, "min": None, "max": None}
    mid = len(vals) // 2
    median = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return {"mean": sum(vals) / len(vals), "median": median, "min": vals[0], "max": vals[-1]}


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return str(value)
        return format(value, spec)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def child_main(measure: Callable[[dict], dict], description: str, argv: list[str] | None = None) -> tuple[int, dict]:
    """A benchmark child process: `measure` the spec at --spec, write its result (or the
    error and traceback that ended it) to --result; (exit code, result)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    spec = read_json(args.spec)
    try:
        result = measure(spec)
    except Exception as err:  # noqa: BLE001 - the parent reports it beside the other runs
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        write_json(args.result, result)
        return 1, result
    write_json(args.result, result)
    return (1 if "error" in result else 0), result


def run_measurement(
    module: str, spec: dict, spec_path: Path, result_path: Path, log_path: Path, timeout: float, backend: str, name: str, echo
) -> dict:
    """Write the spec, run `python -m module` on it in a child process, and return its
    result JSON with the child's run record; a failed or timed-out child becomes a result
    with an `error` (and the log's tail echoed), never an exception."""
    write_json(spec_path, spec)
    if result_path.exists():
        result_path.unlink()
    run = run_child(module, ["--spec", str(spec_path), "--result", str(result_path)], log_path, timeout)
    result = read_json(result_path) if result_path.exists() else {}
    result.setdefault("backend", backend)
    result["child"] = run
    if run["returncode"] != 0 or "error" in result:
        result.setdefault("error", f"child exited with {run['returncode']}" + (" (timed out)" if run["timed_out"] else ""))
        echo(f"[bench] {name} FAILED: {result['error']}\n{log_tail(run['log'], 25)}")
    return result


# ----------------------------------------------------------------------------- the whole job


def write_rows(data_path: str, rows: int, out_path: str) -> int:
    """`rows` rows of a labelled file as Parquet (repeated, with new unique IDs, when the file
    has fewer): the input of a whole-job run, in row groups small enough for the job to plan
    the work units it would for a user's file. Returns the row count written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(
        [
            chunk.table if chunk.table is not None else pa.table(chunk.values)
            for chunk in read_chunks(data_path, columns=["sentence", "label", "lang"])
        ]
    )
    if table.num_rows == 0:
        raise BenchError(f"{data_path}: no rows")
    repeats = -(-rows // table.num_rows)
    table = pa.concat_tables([table] * repeats).slice(0, rows)
    table = table.append_column("ID", pa.array([f"bench-{i:08d}" for i in range(rows)], type=pa.string()))
    pq.write_table(table, out_path, row_group_size=MIN_AUTO_ROWS)
    return rows


def run_script(args: Sequence[str], log_path: str | os.PathLike, timeout: float) -> dict[str, Any]:
    """Run `python <args>` (a jobs/ script, or `-m module ...`) with stdout+stderr into
    `log_path`, the command line first; killed after `timeout` s. Returns {"returncode",
    "seconds", "timed_out", "log"}; never raises for a failed child."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *args]
    started = time.perf_counter()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT), env=child_env())
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            rc = proc.wait()
    return {"returncode": rc, "seconds": round(time.perf_counter() - started, 1), "timed_out": timed_out, "log": str(log_path)}


def last_json_line(log_path: str | os.PathLike) -> dict | None:
    """The last line of a log that is a JSON object (what the jobs print last)."""
    try:
        lines = Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None
