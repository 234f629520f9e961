"""What a person sees when running `python jobs/train.py`: the terminal is asserted, not just
the files. A mistake in the input is the last line of stderr, before Ray starts, with no
traceback and no run folder; a run announces its phases, shows its steps and ends with the
table of metrics.json, with no line at ERROR level; an exception in the worker is one line
naming the log; a cluster that dies mid-run is one paragraph, and the same command resumes.

Each test runs the job as a subprocess on the demo preset with the tiny model (tests/conftest.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CSV = REPO_ROOT / "data" / "demo" / "sentiment_demo.csv"

# Lines a quiet run must not show: log records at ERROR level (Python's or Ray's C++
# `[date E pid tid] file.cc:` form), tracebacks, Ray's forwarded worker output.
ERROR_LINE = re.compile(r"\bERROR\b|^\S*\[[\d\- :,]+ E \d+ \d+\]|Traceback|\((?:\w+ )?pid=\d+")


def tiny_overrides(model_dir: str, storage: Path, name: str, **extra: object) -> list[str]:
    values = {
        "model.name": model_dir,
        "model.dtype": "float32",
        "model.max_seq_length": 128,
        "lora.r": 4,
        "lora.alpha": 8,
        "data.max_train_rows": 64,
        "data.max_validation_rows": 32,
        "train.max_steps": 6,
        "train.save_steps": 2,
        "train.per_device_train_batch_size": 4,
        "train.eval_batch_size": 16,
        "run.cpus_per_worker": 1,
        "run.storage_path": str(storage),
        "run.name": name,
        "tracking.mlflow": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job started from a shell with this interpreter's venv active
    (`. .venv/bin/activate`): the printed commands then say `python`; no cluster named."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SENTIMENT_RAY_LOG")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def train(args: list[str], timeout: float = 420, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/train.py", *args],
        cwd=REPO_ROOT,
        env=job_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ============================================================================ mistakes


@pytest.mark.parametrize("case", ["no sentence column", "bad label", "missing model"])
def test_a_mistake_is_the_last_line_before_ray_starts_and_leaves_no_run_folder(case, tmp_path):
    data = tmp_path / "train.csv"
    if case == "no sentence column":
        data.write_text("text,label\nI loved it,Positive\nawful,Negative\n", encoding="utf-8")
        expected = (
            f"error: {data}: missing column(s) ['sentence']; columns found: ['text', 'label'] "
            "(set data.text_column / data.label_column)"
        )
        args = [f"data.train_path={data}"]
    elif case == "bad label":
        data.write_text("sentence,label\nI loved it,Positive\nawful,Negative\nmeh,Neutral\n", encoding="utf-8")
        expected = re.compile(rf"error: {re.escape(str(data))}: row 3 \(line 4\): unknown label \('Neutral'.*on_bad_rows=skip.*")
        args = [f"data.train_path={data}"]
    else:
        expected = "error: model folder '/nonexistent/model' does not exist or has no config.json"
        args = ["model.name=/nonexistent/model"]
    started = time.time()
    out = train([*args, f"run.storage_path={tmp_path / 'runs'}", "run.name=mistake"], timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr
    assert expected.fullmatch(lines[-1]) if isinstance(expected, re.Pattern) else lines[-1] == expected, lines[-1]
    assert "Traceback" not in out.stderr
    assert "starting a local Ray cluster" not in out.stderr
    assert len(lines) <= 3, lines  # the run's name, maybe what was checked, the error
    assert out.stdout == ""
    assert not (tmp_path / "runs").exists()
    assert time.time() - started < 60  # no cluster start (seconds, on a busy 2-core machine)


# ============================================================================ a run


def _table_rows(stderr: str) -> dict[str, list[str]]:
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("validation "))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        parts = line.split()
        rows[parts[0]] = parts[1:]
    return rows


@pytest.mark.slow
def test_a_run_shows_phases_steps_and_the_table_of_metrics_json_without_error_lines(tiny_model_dir, tmp_path):
    out = train(tiny_overrides(tiny_model_dir, tmp_path / "runs", "shown"))
    assert out.returncode == 0, out.stderr[-4000:]
    err = out.stderr
    bad = [line for line in err.splitlines() if ERROR_LINE.search(line)]
    assert bad == [], bad
    for phase in (
        "run shown: ",
        "data: 64 training rows, 32 validation rows",
        "starting a local Ray cluster",
        "zero-shot scoring 32 validation rows",
        "training 6 steps, a checkpoint every 2",
        "fine-tuned scoring 32 validation rows",
        "saving the adapter",
    ):
        assert phase in err, phase
    assert re.search(r"^  step 6/6  loss \d+\.\d{4}  .*took", err, re.M), err

    run_dir = tmp_path / "runs" / "shown"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = _table_rows(err)
    zs, ft = metrics["zero_shot"], metrics["fine_tuned"]
    assert rows["all"] == [str(ft["n"]), *(f"{x:.3f}" for x in (zs["accuracy"], zs["macro_f1"], ft["accuracy"], ft["macro_f1"]))]
    for lang, row in ft["per_language"].items():
        z = zs["per_language"][lang]
        assert rows[lang] == [
            str(row["n"]),
            *(f"{x:.3f}" for x in (z["accuracy"], z["macro_f1"], row["accuracy"], row["macro_f1"])),
        ]
    calibration = metrics["calibration"]
    # One ECE: the model's own (fine_tuned.ece, the calibration's ece_before), then the calibrated one out of fold.
    assert rows["ECE"] == [f"{zs['ece']:.3f}", f"{ft['ece']:.3f}", "the", "model's", "own"]
    assert ft["ece"] == pytest.approx(calibration["ece_before"])
    assert rows["calibrated"][0] == (f"{ft['ece_calibrated']:.3f}" if calibration["applied"] else "–")

    where = {
        line.split()[0]: line.split(None, 1)[1] for line in err.splitlines() if re.match(r"^(run|adapter|log|next) {2,}", line)
    }
    assert where["run"].startswith(str(run_dir))
    assert where["adapter"] == str(run_dir / "adapter")
    log = Path(where["log"])
    assert log.parent == run_dir / "logs"
    assert log.is_file()
    logged = log.read_text()
    assert "(RayTrainWorker pid=" in logged
    assert "Setting up process group" in logged  # complete in the file
    # The JSON line is the last line on stdout and the only thing there.
    assert out.stdout.count("\n") == 1
    assert json.loads(out.stdout)["run_dir"] == str(run_dir)

    # The next command works as printed.
    labelled = subprocess.run(
        where["next"], shell=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=420, env=job_env()
    )
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    summary = json.loads(labelled.stdout.strip().splitlines()[-1])
    assert summary["adapter"].startswith("adapter@")
    assert summary["submission"].endswith("submission.csv")
    assert Path(summary["submission"]).read_text().count("\n") == summary["labelled"] + 1


@pytest.mark.slow
def test_a_worker_exception_is_one_line_naming_the_log_and_verbose_shows_everything(tiny_model_dir, tmp_path):
    out = train(
        tiny_overrides(tiny_model_dir, tmp_path / "runs", "raises"),
        SENTIMENT_RAY_TEST_FAIL_AT_STEP="3",
        SENTIMENT_RAY_LOG="debug",
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"error: the training worker raised RuntimeError: SENTIMENT_RAY_TEST_FAIL_AT_STEP=3: "
        r"test-injected failure after step 3 \(traceback: (\S+)\); the last checkpoint is step 2 "
        r"\(\S+checkpoint-000002\); rerunning the same command resumes from it",
        last,
    )
    assert match, last
    log = Path(match.group(1))
    assert log.parent == tmp_path / "runs" / "raises" / "logs"
    assert "Traceback" in log.read_text()
    assert "test-injected failure" in log.read_text()
    # SENTIMENT_RAY_LOG=debug: Ray's forwarded worker output is on the terminal too.
    assert "(RayTrainWorker pid=" in out.stderr


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _registered_checkpoint(run_dir: Path) -> int:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].rsplit("-", 1)[1])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@pytest.mark.slow
def test_a_dead_cluster_is_one_paragraph_and_the_same_command_resumes(tiny_model_dir, tmp_path):
    args = tiny_overrides(tiny_model_dir, tmp_path / "runs", "crash", **{"train.max_steps": 300, "train.save_steps": 5})
    run_dir = tmp_path / "runs" / "crash"
    env = job_env()
    driver = subprocess.Popen(
        [sys.executable, "jobs/train.py", *args],
        cwd=REPO_ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None and _registered_checkpoint(run_dir) < 10:
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        # The local cluster's processes end from outside (this test started them: the
        # driver's descendants), the driver itself lives on.
        for process in _descendants(driver.pid):
            try:
                process.send_signal(signal.SIGKILL)
            except Exception:  # noqa: BLE001 - already gone
                pass
        _, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1
    paragraph = err.strip().splitlines()[-4:]
    assert re.fullmatch(r"Training stopped at step \d+ of 300: .+\.", paragraph[0]), paragraph
    step = _registered_checkpoint(run_dir)
    assert paragraph[1] == (
        f"The last checkpoint is step {step} ({run_dir / f'checkpoint-{step:06d}'}); rerunning the same command resumes from it:"
    ), paragraph
    assert shlex.split(paragraph[2]) == ["python", "jobs/train.py", *args]
    assert paragraph[3].startswith("Everything Ray and the workers printed is in ")
    assert "Traceback" not in err

    rerun = train(args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"run crash: {run_dir} (resuming from its checkpoint at step {step})" in rerun.stderr
    assert f"training steps {step + 1}-300 (resuming from the checkpoint at step {step}" in rerun.stderr
    assert json.loads(rerun.stdout)["resumed_from_step"] == step


# ============================================================================ labelling


def label(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = job_env()
    return subprocess.run(
        [sys.executable, "jobs/label.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_the_label_job_shows_its_progress_and_keeps_rays_output_in_its_log(tiny_model_dir, tmp_path):
    rows = DEMO_CSV.read_text(encoding="utf-8").splitlines()[:41]
    (tmp_path / "in.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=float32", "model.max_seq_length=96", "label.num_actors=1"]
    out = label(["--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out"), *overrides])
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["labelled"] == 40
    lines = out.stderr.strip().splitlines()
    last_progress = max(i for i, line in enumerate(lines) if line.startswith("labelling "))
    assert lines[last_progress].startswith("labelling 40 / 40 rows (100%)"), lines
    # Then the summary: languages (the input's lang column), where everything is, the rows cut
    # to fit (a warning), the next command, runnable as printed.
    closing = lines[last_progress + 1 :]
    assert closing[0].startswith("languages  en "), closing
    assert closing[1].startswith(f"output     {tmp_path / 'out'}  (40 rows labelled, "), closing
    assert f"metrics    {tmp_path / 'out' / 'metrics.json'}" in closing
    assert f"log        {summary['log']}" in closing
    assert any(line.startswith("warning: ") and "rows were cut to fit" in line for line in closing) == bool(summary["truncated"])
    assert closing[-1] == f"next       python jobs/eval.py --predictions {tmp_path / 'out'}", closing
    # Before the summary: nothing but the progress and Ray Data's one notice about actor constructor arguments.
    others = [line for line in lines[:last_progress] if not line.startswith("labelling ") and "constructor arguments" not in line]
    assert others == [], others
    assert "pid=" in Path(summary["log"]).read_text(encoding="utf-8")  # the actors' output is there instead

    # A mistake stops before Ray starts, in one line.
    (tmp_path / "bad.csv").write_text("ID,text\n1,hello\n", encoding="utf-8")
    bad = label(["--input", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "bad-out"), *overrides], timeout=120)
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: "), bad.stderr
    assert "Traceback" not in bad.stderr
    assert "pid=" not in bad.stderr


LABEL_OVERRIDES = ["model.dtype=float32", "model.max_seq_length=96", "label.num_actors=1", "label.write_submission=true"]


def test_a_quote_never_closed_is_one_line_and_leaves_no_output_folder(tiny_model_dir, tmp_path):
    rows = "".join(f"c{i},row {i},Positive\n" for i in range(2, 5000))
    (tmp_path / "in.csv").write_text(f'ID,sentence,label\nc0,fine,Positive\nc1,"unterminated quote,Positive\n{rows}')
    out = label(
        [
            "--input",
            str(tmp_path / "in.csv"),
            "--output",
            str(tmp_path / "new" / "out"),
            f"model.name={tiny_model_dir}",
            *LABEL_OVERRIDES,
        ],
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'in.csv'}: line 3: a quote opens in row 2 and is never closed: the 4998 lines after it, "
        'to the end of the file, would be one field; close the quote, or double a quote inside a quoted field ("")'
    ]
    assert not (tmp_path / "new").exists()  # the job failed its checks: nothing left behind


@pytest.mark.slow
def test_a_mixed_folder_names_the_files_not_read_and_ids_come_out_as_written(tiny_model_dir, tmp_path):
    ids = ["7", " 7", "9 ", "\t=tab", "=1+1", "+cmd", "-3", "@sum", "'=quoted", "007"]
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "ids.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["ID", "sentence", "label"]] + [[i, f"review {n}", "Positive"] for n, i in enumerate(ids)])
    (folder / "notes.txt").write_text("not data\n")
    out = label(["--input", str(folder), "--output", str(tmp_path / "out"), f"model.name={tiny_model_dir}", *LABEL_OVERRIDES])
    assert out.returncode == 0, out.stderr[-4000:]
    assert (
        f"{folder}: 1 file there is not read (not .csv, .parquet, .pq, .jsonl, .json (text formats optionally .gz), "
        "or a hidden name starting with '.' or '_'): notes.txt" in out.stderr
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["files"] == 1
    assert summary["files_not_read"] == [str(folder / "notes.txt")]
    assert summary["labelled"] == len(ids)
    assert summary["bad_rows"] == 0
    # Byte for byte in every output: the Parquet predictions, the CSV shards, submission.csv.
    import pyarrow.parquet as pq

    predictions = [
        i for p in sorted((tmp_path / "out" / "predictions").glob("*.parquet")) for i in pq.read_table(p).column("ID").to_pylist()
    ]
    shards = [r[0] for p in sorted((tmp_path / "out" / "csv").glob("*.csv")) for r in list(csv.reader(p.open(newline="")))[1:]]
    submission = [r[0] for r in list(csv.reader((tmp_path / "out" / "submission.csv").open(newline="")))[1:]]
    assert predictions == shards == submission == ids


FRENCH = [
    "Ce produit est vraiment excellent, je le recommande à tous mes amis.",
    "La qualité est décevante et le service client ne répond jamais.",
    "Livraison rapide et emballage soigné, très satisfait de mon achat.",
    "Je ne rachèterai pas cette marque, l'appareil est tombé en panne après une semaine.",
    "Un hôtel magnifique avec une vue superbe sur la mer.",
    "Le film était long et ennuyeux, j'ai failli m'endormir.",
]


@pytest.mark.slow
def test_the_label_job_warns_of_rows_in_languages_the_adapter_was_not_calibrated_on(tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    from sentiment_ray import languages

    trained = train(tiny_overrides(tiny_model_dir, tmp_path / "runs", "langs"))
    assert trained.returncode == 0, trained.stderr[-4000:]
    adapter = tmp_path / "runs" / "langs" / "adapter"
    calibrated = languages.calibrated_languages(json.loads((adapter / "data_profile.json").read_text()))
    assert "en" in calibrated
    assert "fr" not in calibrated
    # English rows the adapter was calibrated on, French ones it never saw, one gold label
    # outside the label set; no lang column: each row's language is detected.
    english = [r for r in csv.DictReader(DEMO_CSV.open(encoding="utf-8")) if r["lang"] == "en"][:12]
    with (tmp_path / "mixed.csv").open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["ID", "sentence", "label"])
        out.writerows([r["ID"], r["sentence"], r["label"]] for r in english)
        out.writerows([f"fr-{i}", s, "Positive"] for i, s in enumerate(FRENCH))
        out.writerow(["odd-1", "The parcel came on Tuesday.", "Neutral"])
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.dtype=float32",
        "model.max_seq_length=128",
        "label.num_actors=1",
        "label.max_error=0.05",
    ]
    out = label(
        ["--input", str(tmp_path / "mixed.csv"), "--output", str(tmp_path / "out"), "--adapter", str(adapter), *overrides]
    )
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    shares = summary["languages"]["shares"]
    assert shares["fr"] == pytest.approx(len(FRENCH) / summary["labelled"], abs=1e-4)
    warning = f"warning: {languages.uncalibrated_line(shares, calibrated)}"
    assert warning.startswith(
        f"warning: {summary['languages']['not_calibrated_share']:.1%} of rows are in languages the adapter "
        "was not calibrated on ("
    )
    assert "fr " in warning
    assert warning.endswith("their confidence is not calibrated")
    lines = out.stderr.strip().splitlines()
    assert warning in lines, lines
    assert (
        "warning: 1 row(s) have a gold label outside the label set, not scored: 'Neutral' (1); "
        "map them with data.label_map or fix the labels" in lines
    )
    assert f"languages  {languages.shares_text(shares)}" in lines
    assert any(line.startswith("accepted   ") for line in lines), lines
    # The rows: their detected language, and no French row accepted, whatever its confidence.
    table = pq.read_table(next((tmp_path / "out" / "predictions").glob("part-*.parquet")))
    french = [
        a for lang, a in zip(table.column("lang_detected").to_pylist(), table.column("accepted").to_pylist()) if lang == "fr"
    ]
    assert len(french) == len(FRENCH)
    assert not any(french)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["unknown_labels"] == {"Neutral": 1}
    assert "ece" in metrics["per_language"]["fr"]
    report = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert all(f'id="{i}"' in report for i in ("unknown-labels", "not-calibrated", "accepted", "risk-coverage"))


# ============================================================================ Ctrl-C

# Ctrl-C on a terminal signals its whole foreground process group: the driver and the local
# Ray cluster it started. Each driver here gets a session of its own, and the test signals
# that group alone.


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert condition(), "timed out"


@pytest.mark.slow
def test_ctrl_c_of_a_run_is_one_line_naming_the_registered_checkpoint_and_the_rerun_resumes_from_it(tiny_model_dir, tmp_path):
    args = tiny_overrides(tiny_model_dir, tmp_path / "runs", "ctrl-c", **{"train.max_steps": 120, "train.save_steps": 4})
    run_dir = tmp_path / "runs" / "ctrl-c"
    env = job_env()
    driver = subprocess.Popen(
        [sys.executable, "jobs/train.py", *args],
        cwd=REPO_ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _registered_checkpoint(run_dir) >= 4, driver)
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err[-3000:]
    assert out == ""
    assert [line for line in err.splitlines() if ERROR_LINE.search(line)] == []
    step = _registered_checkpoint(run_dir)
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"Training interrupted by SIGINT(?: at step \d+ of 120)?: the last checkpoint is step (\d+) "
        r"\((.+)\); rerun the same command to resume from it: (.+)",
        last,
    )
    assert match, err[-3000:]
    assert int(match.group(1)) == step
    assert Path(match.group(2)).resolve() == (run_dir / f"checkpoint-{step:06d}").resolve()
    assert shlex.split(match.group(3)) == ["python", "jobs/train.py", *args]

    rerun = train(args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["resumed_from_step"] == step


@pytest.mark.slow
def test_ctrl_c_of_a_label_job_is_one_line_naming_the_committed_units_and_the_rerun_labels_the_rest(tiny_model_dir, tmp_path):
    lines = DEMO_CSV.read_text(encoding="utf-8").splitlines()
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")  # 4,000 rows
    args = [
        "--input",
        str(tmp_path / "in.csv"),
        "--output",
        str(tmp_path / "out"),
        "--rows-per-unit",
        "250",
        f"model.name={tiny_model_dir}",
        *LABEL_OVERRIDES,
    ]
    env = job_env()
    driver = subprocess.Popen(
        [sys.executable, "jobs/label.py", *args],
        cwd=REPO_ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    done = tmp_path / "out" / "_done"
    try:
        _wait_for(lambda: done.is_dir() and any(done.iterdir()), driver)
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err[-3000:]
    assert out == ""
    shown = [
        line for line in err.strip().splitlines() if not line.startswith("labelling ") and "constructor arguments" not in line
    ]
    committed = len(list(done.glob("*.json")))
    assert shown == [
        f"Labelling interrupted by SIGINT: {committed} of 16 units ({committed * 250:,} of 4,000 rows) are committed in "
        f"{tmp_path / 'out'}; rerun the same command to label the rest: python jobs/label.py {shlex.join(args)}"
    ], err[-3000:]
    assert 0 < committed < 16

    rerun = label(args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["units"]["done_before"] == committed
    assert summary["labelled"] == 4000
