"""Probe: Ray Data's native readers + ID checkpointing vs the labelling job's work units.

    .venv/bin/python benchmarks/native_reader_probe.py --rows 20000 --out /tmp/probe

On a tiny random Llama (tests/tiny_model.py) and `--rows` demo rows replicated into `--files`
CSV files (unique IDs), on CPU, it measures: (1) lines of code of both designs; (2) rows/s and
prompt tokens/s of the whole job (1 model actor, `--repeat` runs each; "job" = the child
process's wall time incl. Ray start and model load, "pipeline" = after `ray.init`); (3) rows and
unique IDs out after SIGKILLing the model actor mid-run (Ray restarts it), and after SIGKILLing
the driver mid-run and rerunning the command; (4) what each design reports for bad rows (empty
sentence, invalid UTF-8, a short row after a quoted multi-line field); (5) duplicate IDs: one
run, and a rerun over a checkpoint already holding some IDs; (6) output order with and without
`DataContext.execution_options.preserve_order` (1 actor: the runs of 2; and 2 actors).

The native job is read_csv -> map_batches(a class holding the model, calling `Labeler.predict`)
-> write_parquet under `CheckpointConfig(id_column="ID")`, built only far enough to measure (no
validation, quarantine, submission or evaluation). Each job is a child process with a private
`ray.init(num_cpus=2)` (3 for a native resume, 4 for two actors). Prints a JSON line per
measurement, writes them all to <out>/results.json and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo" / "sentiment_demo.csv"
# What the unit design runs: all of label/, and the io/ modules it imports (shared with training).
UNIT_MODULES = [f"label/{p.name}" for p in sorted((REPO / "sentiment_ray" / "label").glob("*.py")) if p.name != "__init__.py"] + [
    f"io/{name}.py" for name in ("readers", "rows", "ids", "quarantine", "values", "files", "storage", "uris")
]


# ----------------------------------------------------------------------------- the native design


class NativeLabeler:
    """map_batches callable class: loads the model once, appends the prediction columns."""

    def __init__(self, cfg: dict):
        from sentiment_ray.label.labeler import Labeler

        self.labeler = Labeler(cfg)

    def __call__(self, batch):
        import pyarrow as pa

        columns, tokens = self.labeler.predict(batch.column("sentence").to_pylist())
        for name, array in columns.items():
            batch = batch.append_column(name, array)
        per_row = [tokens] + [0] * (batch.num_rows - 1)  # the batch's prompt tokens, on its first row
        return batch.append_column("batch_prompt_tokens", pa.array(per_row, pa.int64()))


def native_pipeline(files: list[str], out: Path, cfg: dict, preserve_order: bool, keep_checkpoint: bool, actors=1) -> None:
    import ray
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    from sentiment_ray.label import labeler

    # The same window of rows per predict call as the unit design's actor reads at once.
    window = getattr(labeler, "CHUNK_ROWS", None) or cfg["label"]["batch_size"] * getattr(labeler, "CHUNK_BATCHES", 16)
    ctx = DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column="ID", checkpoint_path=str(out / "_checkpoint"), delete_checkpoint_on_success=not keep_checkpoint
    )
    ctx.execution_options.preserve_order = preserve_order
    ray.data.read_csv(files).map_batches(
        NativeLabeler,
        fn_constructor_args=(cfg,),
        batch_size=window,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=0,
        num_cpus=1,
    ).write_parquet(str(out / "predictions"))


# ----------------------------------------------------------------------------- a job (child process)


def kill_actor_when(ready, marker: str, record: dict, dashboard: str) -> None:
    """SIGKILL the ALIVE actor whose class name mentions `marker` once `ready()`. `dashboard`:
    this job's own cluster (other people's clusters run on this machine)."""
    from ray.util.state import list_actors

    while not ready():
        time.sleep(0.2)
    for actor in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        if marker in (actor.class_name or ""):
            os.kill(actor.pid, signal.SIGKILL)
            record.update(killed=actor.class_name, killed_pid=actor.pid, killed_at_s=round(time.time() - record["t0"], 1))
            return
    record["killed"] = "no matching actor found"


def error_text(err: BaseException) -> str:
    """A Ray task error: the `...Error: message` lines of its remote traceback; else the error."""
    import re

    if not hasattr(err, "cause"):
        return f"{type(err).__name__}: {err}"[:1500]
    text = f"{err}\n{err.cause}"
    found = re.findall(r"^[\w.]*(?:Error|Exception)(?:\([\w.]+\))?: .*$", text, re.M)
    return " | ".join(dict.fromkeys(found))[:1500] or f"{type(err).__name__}: {err}"[:1500]


def run_job(args) -> None:
    import ray
    from ray.job_config import JobConfig

    cfg, out, t_start = json.loads(Path(args.cfg).read_text()), Path(args.output), time.time()
    context = ray.init(
        num_cpus=int(args.cpus), job_config=JobConfig(code_search_path=[str(REPO)]), logging_level="WARNING", log_to_driver=False
    )
    record = {"job": args.job, "cpus": int(args.cpus), "t0": time.time()}
    first_output = f"{out}/_done/*.json" if args.job == "units" else f"{out}/predictions/*.parquet"
    if args.kill_actor:
        threading.Thread(
            target=kill_actor_when,
            daemon=True,
            args=(lambda: glob.glob(first_output), "Labeler", record, f"http://{context.dashboard_url}"),
        ).start()
    try:
        if args.job == "units":
            from sentiment_ray.config import ExperimentConfig
            from sentiment_ray.label.recipe import label_dataset

            summary = label_dataset(ExperimentConfig(**cfg), args.input, str(out), rows_per_unit=int(args.rows_per_unit))
            record.update({k: summary[k] for k in ("prompt_tokens", "rows", "labelled", "bad_rows")})
        else:
            import pyarrow.parquet as pq

            native_pipeline(sorted(glob.glob(args.input)), out, cfg, args.preserve_order, args.keep_checkpoint, int(args.actors))
            tokens = pq.read_table(out / "predictions", columns=["batch_prompt_tokens"]).column(0)
            record["prompt_tokens"] = int(tokens.to_numpy().sum())
    except Exception as err:  # noqa: BLE001 - reported, not raised
        record["error"] = error_text(err)
    record["pipeline_s"] = round(time.time() - record.pop("t0"), 2)
    record["child_s"] = round(time.time() - t_start, 2)
    print("RESULT " + json.dumps(record), flush=True)
    ray.shutdown()


# ----------------------------------------------------------------------------- the orchestrator


def make_input(folder: Path, rows: int, files: int, offset: int = 0) -> list[str]:
    """`rows` demo rows from row `offset` on, replicated as needed, IDs `<demo ID>-r<copy>`."""
    with open(DEMO, newline="", encoding="utf-8") as f:
        header, *demo = list(csv.reader(f))
    folder.mkdir(parents=True, exist_ok=True)
    per_file, paths, n = -(-rows // files), [], offset
    for k in range(files):
        paths.append(str(folder / f"part-{k}.csv"))
        with open(paths[-1], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for _ in range(min(per_file, rows + offset - n)):
                writer.writerow([f"{demo[n % len(demo)][0]}-r{n // len(demo)}", *demo[n % len(demo)][1:]])
                n += 1
    return paths


BAD_ROWS = {  # inserted after data row 10 of a 40-row file
    "empty": [b"bad-empty,,Positive,en,probe"],
    "utf8": [b"bad-utf8,caf\xe9 au lait \xff,Positive,en,probe"],
    "short": [b'ok-multiline,"a quoted field\nspanning two lines",Negative,en,probe', b"bad-short,too few fields"],
}


def write_bad_input(folder: Path, kinds) -> str:
    lines = Path(make_input(folder / "_good", 40, 1)[0]).read_bytes().split(b"\n")
    path = folder / f"bad-{'-'.join(kinds)}.csv"
    path.write_bytes(b"\n".join(lines[:11] + [r for k in kinds for r in BAD_ROWS[k]] + lines[11:]))
    return str(path)


def child(
    args,
    job: str,
    input_glob: str,
    output: Path,
    *,
    kill_actor=False,
    kill_driver=False,
    preserve_order=False,
    keep_checkpoint=False,
    cpus=2,
    actors=1,
    timeout=None,
) -> dict:
    """Run one job in a child process (its own session); SIGKILL it after its first output
    when `kill_driver`, or after `timeout` s (a hang); then end what its session left running."""
    cmd = [
        sys.executable,
        __file__,
        "--job",
        job,
        "--input",
        input_glob,
        "--output",
        str(output),
        "--cfg",
        args.cfg_path,
        "--cpus",
        str(cpus),
        "--actors",
        str(actors),
        "--rows-per-unit",
        str(args.rows // (2 * args.files)),
    ]
    cmd += ["--kill-actor"] * kill_actor + ["--preserve-order"] * preserve_order + ["--keep-checkpoint"] * keep_checkpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    log = open(f"{output}.{time.strftime('%H%M%S')}.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True, start_new_session=True)
    try:
        if kill_driver:
            first = f"{output}/_done/*.json" if job == "units" else f"{output}/predictions/*.parquet"
            while not glob.glob(first) and proc.poll() is None:
                time.sleep(0.2)
            proc.kill()
            return {"job": job, "driver_killed_at_s": round(time.time() - t0, 1)}
        stdout, _ = proc.communicate(timeout=timeout or args.timeout)
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"error": f"no result (rc {proc.returncode}); see {log.name}"}
        return {**result, "job_s": round(time.time() - t0, 2)}
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"job": job, "cpus": cpus, "error": f"hung: no result after {timeout or args.timeout} s (killed)"}
    finally:
        proc.wait()
        time.sleep(2)
        end_session(proc.pid)


def end_session(sid: int) -> None:
    """SIGKILL the processes that share the killed driver's `sid` (its raylet, workers, ...)."""
    for line in subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.splitlines():
        pid, s = map(int, line.split())
        with contextlib.suppress(ProcessLookupError):
            if s == sid:
                os.kill(pid, signal.SIGKILL)


def count_output(output: Path, input_ids: list[str]) -> dict | None:
    """Rows / unique IDs of the output's Parquet files (read in name order) vs the input's."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(f"{output}/predictions/*.parquet"))
    if not files:
        return None
    per_file = [[str(i) for i in pq.read_table(f, columns=["ID"]).column("ID").to_pylist()] for f in files]
    ids, seen, rank = [i for part in per_file for i in part], set(), {v: k for k, v in enumerate(input_ids)}
    seen.update(ids)
    expected = [i for i in input_ids if i in seen]
    result = {
        "input_rows": len(input_ids),
        "output_rows": len(ids),
        "unique_ids": len(seen),
        "files": len(files),
        "duplicated_rows": len(ids) - len(seen),
        "input_ids_missing": len(set(input_ids) - seen),
        "in_input_order": ids == expected,
        "adjacent_pairs_in_order": round(
            sum(rank.get(a, 0) < rank.get(b, 0) for a, b in zip(ids, ids[1:])) / max(1, len(ids) - 1), 4
        ),
    }
    result["file_first_rows"] = [rank.get(part[0]) for part in per_file if part][:12]  # input position of each file's 1st row
    if (output / "submission.csv").exists():
        with open(output / "submission.csv", newline="") as f:
            result["submission_in_input_order"] = [r[0] for r in list(csv.reader(f))[1:]] == expected
    return result


def ids_of(paths: list[str]) -> list[str]:
    rows = [r for p in paths for r in list(csv.reader(open(p, newline="", encoding="utf-8", errors="replace")))[1:]]
    return [r[0] for r in rows if r]


def lines_of_code(text: str) -> int:  # non-blank lines that are not comments (docstrings count)
    return sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))


def pyarrow_says(path: str) -> str:
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=False))
        return f"no error; column types {dict(zip(table.column_names, map(str, table.schema.types)))}"
    except Exception as err:  # noqa: BLE001 - it is the finding
        return f"{type(err).__name__}: {err}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("--rows", 20000), ("--files", 4), ("--repeat", 2), ("--timeout", 900), ("--hang-timeout", 150)):
        p.add_argument(name, type=int, default=default)  # hang-timeout: when a 2-CPU native resume counts as hung
    p.add_argument("--out", default="/tmp/probe")
    p.add_argument("--only", default="1,2,3,4,5,6", help="which of the 6 measurements to run")
    for name in ("--job", "--input", "--output", "--cfg", "--cpus", "--actors", "--rows-per-unit"):  # a child job's
        p.add_argument(name, help=argparse.SUPPRESS)
    for flag in ("--kill-actor", "--preserve-order", "--keep-checkpoint"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        return run_job(args)

    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from tiny_model import build_tiny_model

    out, only, results = Path(args.out), set(args.only.split(",")), []
    if not (out / "model" / "config.json").exists():
        build_tiny_model(out / "model")
    args.cfg_path = str(out / "cfg.json")
    Path(args.cfg_path).write_text(
        json.dumps(
            {  # tests/conftest.py's tiny_cfg, as the brief sets it
                "model": {
                    "name": str(out / "model"),
                    "backend": "hf",
                    "load_in_4bit": False,
                    "dtype": "float32",
                    "max_seq_length": 96,
                },
                "run": {"use_gpu": "false"},
                "label": {"batch_size": 64, "num_actors": 1, "write_submission": True},
            }
        )
    )
    subprocess.run(["rm", "-rf", str(out / "input")], check=True)
    inputs = make_input(out / "input", args.rows, args.files)
    input_glob, input_ids = str(out / "input" / "*.csv"), ids_of(inputs)

    def fresh(name: str) -> Path:
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
        return out / name

    def report(point: str, what: str, **data) -> None:
        results.append({"point": point, "what": what, **data})
        print(json.dumps(results[-1]), flush=True)

    def throughput(what: str, folder: str, job: str, **options) -> None:
        r = child(args, job, input_glob, fresh(folder), **options)
        report(
            "2",
            f"throughput {what}",
            job_s=r.get("job_s"),
            pipeline_s=r.get("pipeline_s"),
            rows_per_s_job=round(args.rows / r["job_s"], 1),
            tokens_per_s_job=round((r.get("prompt_tokens") or 0) / r["job_s"], 1),
            rows_per_s_pipeline=round(args.rows / r["pipeline_s"], 1) if r.get("pipeline_s") else None,
            prompt_tokens=r.get("prompt_tokens"),
            error=r.get("error"),
            output=count_output(out / folder, input_ids),
            load_1min=round(os.getloadavg()[0], 2),
        )

    if "1" in only:
        per_module = {m: lines_of_code((REPO / "sentiment_ray" / m).read_text()) for m in UNIT_MODULES}
        source = Path(__file__).read_text()
        native = source[source.index("class NativeLabeler") : source.index("# ---", source.index("def native_pipeline"))]
        report(
            "1",
            "lines of code (non-blank, non-comment)",
            units=sum(per_module.values()),
            units_label_only=sum(v for m, v in per_module.items() if m.startswith("label/")),
            native=lines_of_code(native),
            units_by_module=per_module,
        )
    if "2" in only:
        for k in range(args.repeat):
            for job, order in (("units", False), ("native", False), ("native", True)):
                throughput(
                    f"{job}{' preserve_order' * order} run {k + 1}",
                    f"thr-{job}{'-ordered' * order}-{k}",
                    job,
                    preserve_order=order,
                )
    if "3" in only:
        for job in ("units", "native"):
            o = fresh(f"kill-actor-{job}")
            r = child(args, job, input_glob, o, kill_actor=True)
            report(
                "3",
                f"actor SIGKILL {job}",
                **{k: r.get(k) for k in ("killed", "killed_pid", "killed_at_s", "error", "job_s")},
                output=count_output(o, input_ids),
            )
            o = fresh(f"kill-driver-{job}")
            first = child(args, job, input_glob, o, kill_driver=True)
            partial = count_output(o, input_ids)
            if job == "native":  # a resume adds a CheckpointFilter actor (1 CPU)
                hung = child(args, job, input_glob, o, timeout=args.hang_timeout)
                report("3", "native rerun over a checkpoint, 2 CPUs", error=hung.get("error"), output=count_output(o, input_ids))
            second = child(args, job, input_glob, o, cpus=3 if job == "native" else 2)
            report(
                "3",
                f"driver SIGKILL + rerun {job}",
                killed_at_s=first["driver_killed_at_s"],
                after_kill=partial,
                rerun_cpus=second.get("cpus"),
                rerun_s=second.get("job_s"),
                error=second.get("error"),
                output=count_output(o, input_ids),
            )
    if "4" in only:
        path = write_bad_input(out / "bad-input", list(BAD_ROWS))
        o = fresh("bad-units")
        r = child(args, "units", path, o)
        entries = [json.loads(x) for x in open(o / "quarantine.jsonl")] if (o / "quarantine.jsonl").exists() else []
        report(
            "4",
            "bad rows units (all kinds, one file)",
            error=r.get("error"),
            output=count_output(o, ids_of([path])),
            quarantine=[{k: q.get(k) for k in ("file", "row", "line", "reason")} for q in entries],
        )
        for kind in BAD_ROWS:
            path = write_bad_input(out / "bad-input", [kind])
            o = fresh(f"bad-native-{kind}")
            r = child(args, "native", path, o)
            report(
                "4",
                f"bad rows native: {kind}",
                error=r.get("error"),
                pyarrow_alone=pyarrow_says(path),
                output=count_output(o, ids_of([path])),
            )
        ids = out / "bad-input" / "leading-zero-ids.csv"
        ids.write_text("ID,sentence\n007,fine\n008,good\n")
        report("4", "ID types read_csv infers (pyarrow alone)", pyarrow_alone=pyarrow_says(str(ids)))
    if "5" in only:
        dup = out / "dup-input"
        a, b = make_input(dup / "a", 400, 1)[0], make_input(dup / "b", 400, 1, offset=397)[0]  # b repeats 3 IDs of a
        both, both_ids = str(dup / "*" / "*.csv"), ids_of([a, b])
        for job in ("units", "native"):
            o = fresh(f"dup-{job}")
            r = child(args, job, both, o)
            report("5", f"duplicate IDs, one run {job}", error=r.get("error"), output=count_output(o, both_ids))
        o = fresh("dup-native-resume")
        child(args, "native", a, o, keep_checkpoint=True)  # the state of a run that died after file a's blocks
        r = child(args, "native", both, o, cpus=3)
        report(
            "5",
            "duplicate IDs: native rerun over a checkpoint holding a's IDs",
            error=r.get("error"),
            output=count_output(o, both_ids),
        )
        r = child(args, "native", both, o, cpus=3)
        report("5", "native: the same command again after success", error=r.get("error"), output=count_output(o, both_ids))
    if "6" in only:
        for order in (False, True):  # 2 model actors (4 logical CPUs on 2 cores): blocks may finish out of order
            throughput(
                f"native 2 actors{' preserve_order' * order}",
                f"order-2actors{'-ordered' * order}",
                "native",
                preserve_order=order,
                cpus=4,
                actors=2,
            )
        report(
            "6",
            "output order (parquet files in name order)",
            runs=[
                {
                    "what": r["what"],
                    "pipeline_s": r["pipeline_s"],
                    **{
                        k: (r["output"] or {}).get(k)
                        for k in ("files", "in_input_order", "file_first_rows", "submission_in_input_order")
                    },
                }
                for r in results
                if r["point"] == "2"
            ],
        )

    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'pt':<3}{'what':<58}headline")
    for r in results:
        print(f"{r['point']:<3}{r['what'][:57]:<58}{headline(r)}")


def headline(r: dict) -> str:
    o, parts = r.get("output") or {}, []
    if "rows_per_s_job" in r:
        parts.append(
            f"{r['rows_per_s_job']} rows/s, {r['tokens_per_s_job']} tok/s (job {r['job_s']} s, pipeline {r['pipeline_s']} s)"
        )
    if o:
        parts.append(
            f"out {o['output_rows']} rows / {o['unique_ids']} IDs of {o['input_rows']}, order kept: {o['in_input_order']}"
        )
    for key in ("units", "native", "killed", "pyarrow_alone", "error"):
        if r.get(key):
            parts.append(f"{key}: {str(r[key])[:90]}".replace("\n", " "))
    if "quarantine" in r:
        parts.append("quarantined " + "; ".join(f"row {q['row']} line {q['line']}: {q['reason'][:25]}" for q in r["quarantine"]))
    for run in r.get("runs", []):
        parts.append(f"{run['what'][11:]}: kept={run['in_input_order']} files start at {run['file_first_rows']}")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
