"""Offline labelling end to end on a local Ray cluster with the tiny random Llama (CPU):
one prediction per input ID across files and formats, both modes, bad rows, resume after a
killed actor and a killed driver, agreement with the training job's validation scoring."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from tiny_model import demo_rows

from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.values import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS_PER_UNIT = 6
# a.csv: 40 rows / 6 -> 7 units; b.parquet: 6 row groups of <= 7 rows, one unit each; c.jsonl.gz: 7.
UNITS = 20


def make_cfg(model_dir: str, **label) -> ExperimentConfig:
    return ExperimentConfig(
        model={"name": model_dir, "backend": "hf", "load_in_4bit": False, "dtype": "float32", "max_seq_length": 96},
        run={"use_gpu": "false"},
        label={"batch_size": 8, "num_actors": 1, "write_submission": True, **label},
    )


def write_inputs(folder: Path) -> list[str]:
    """Three files, three formats, 120 rows, all good; IDs in input order returned."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = demo_rows(0, 120)
    pacsv.write_csv(pa.Table.from_pylist(rows[:40]), folder / "a.csv")
    pq.write_table(pa.Table.from_pylist(rows[40:80]), folder / "b.parquet", row_group_size=7)
    with gzip.open(folder / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows[80:]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return [r["ID"] for r in rows]


def outputs(out: Path) -> dict:
    """Everything a run leaves that must not depend on crashes, timing or process ids."""
    shards = sorted((out / "predictions").glob("part-*.parquet"))
    return {
        "predictions": [pq.read_table(s) for s in shards],
        "csv": {p.name: p.read_bytes() for p in sorted((out / "csv").glob("*.csv"))},
        "submission": (out / "submission.csv").read_bytes() if (out / "submission.csv").exists() else None,
        "quarantine": (out / "quarantine.jsonl").read_bytes(),
        "metrics": json.loads((out / "metrics.json").read_text()),
        "done": sorted(p.name for p in (out / "_done").glob("*.json")),
    }


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a["done"] == b["done"]
    assert len(a["predictions"]) == len(b["predictions"])
    for x, y in zip(a["predictions"], b["predictions"]):
        assert x.equals(y)
    assert a["csv"] == b["csv"]
    assert a["submission"] == b["submission"]
    assert a["quarantine"] == b["quarantine"]
    assert a["metrics"] == b["metrics"]


def committed(out: Path) -> int:
    return len(list((out / "_done").glob("*.json"))) if (out / "_done").exists() else 0


def markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("label-inputs")
    return folder, write_inputs(folder / "in")


@pytest.fixture(scope="module")
def clean_run(ray_address, tiny_model_dir, inputs, tmp_path_factory):
    """An uninterrupted scoring run over the three files: the reference output."""
    from sentiment_ray.label.recipe import label_dataset

    out = tmp_path_factory.mktemp("clean") / "out"
    summary = label_dataset(make_cfg(tiny_model_dir), str(inputs[0] / "in"), str(out), rows_per_unit=ROWS_PER_UNIT)
    return out, summary


# ----------------------------------------------------------------------------- no Ray needed


def test_report_png_has_both_panels_in_scoring_mode_only_matrix_otherwise():
    from sentiment_ray.report.plots import render_report_png

    confusion = {"labels": ["Positive", "Negative"], "matrix": [[5, 1], [2, 7]]}
    bins = [
        {"lo": i / 10, "hi": (i + 1) / 10, "count": c, "accuracy": a, "confidence": m}
        for i, (c, a, m) in enumerate(
            [(0, None, None)] * 5 + [(4, 0.5, 0.55), (3, 0.67, 0.66), (0, None, None), (2, 1.0, 0.85), (6, 1.0, 0.97)]
        )
    ]
    both = render_report_png(confusion, bins, title="t", ece=0.05)
    matrix_only = render_report_png(confusion, None)
    for png in (both, matrix_only):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = lambda png: int.from_bytes(png[16:20], "big")  # noqa: E731 - IHDR width
    assert width(both) > 1.6 * width(matrix_only)
    with pytest.raises(ValueError, match="does not match"):
        render_report_png({"labels": ["a", "b", "c"], "matrix": [[1, 2], [3, 4]]}, None)


def test_duplicate_ids_fail_before_any_model_work(tmp_path, tiny_model_dir):
    from sentiment_ray.label.recipe import label_dataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("ID,sentence\nd1,x\nd2,y\n")
    (tmp_path / "in" / "b.csv").write_text("ID,sentence\nd3,z\nd1,w\n")
    with pytest.raises(DataError, match=r"(?s)1 duplicate ID in column 'ID'.*'d1': .*b\.csv: row 2, first at .*a\.csv: row 1"):
        label_dataset(make_cfg(tiny_model_dir), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_labeler_without_ray_scores_in_input_order(tiny_model_dir):
    from sentiment_ray.label.labeler import Labeler

    labeler = Labeler(make_cfg(tiny_model_dir, batch_size=2))
    sentences = ["great", "a much longer sentence about a terrible film", "ok then", "x " * 200]
    columns, tokens = labeler.predict(sentences)
    probs = np.stack([columns["p_Positive"].to_numpy(), columns["p_Negative"].to_numpy()], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # Same rows one by one (no padding, no sorting) give the same numbers: order is kept.
    single = np.concatenate([labeler.scorer.score([s]).probs for s in sentences])
    np.testing.assert_allclose(probs, single, atol=1e-5)
    assert columns["truncated"].to_pylist() == [False, False, False, True]
    assert tokens > 0


def test_progress_inside_a_unit_follows_the_scored_batches(tiny_model_dir, tmp_path, monkeypatch):
    """A person watching one large unit sees its rows counted as batches are scored, not only
    when the unit is done; the count only grows and ends at the unit's rows."""
    from sentiment_ray.label import labeler as labeler_module
    from sentiment_ray.label.plan import plan_units

    monkeypatch.setattr(labeler_module, "PROGRESS_EVERY_S", 0.0)
    pacsv.write_csv(pa.Table.from_pylist(demo_rows(0, 40)), tmp_path / "in.csv")
    plan = plan_units([str(tmp_path / "in.csv")], text_column="sentence", id_column="ID", generate_ids=False, rows_per_unit=40)

    class Board:  # the progress actor's interface: board.update.remote(unit_id, rows, bad)
        def __init__(self):
            self.update, self.rows = self, []

        def remote(self, unit_id, rows, bad):
            self.rows.append(rows)

    board = Board()
    labeler = labeler_module.Labeler(make_cfg(tiny_model_dir, batch_size=8), output_dir=str(tmp_path / "out"), progress=board)
    assert labeler.label_unit(plan.units[0])["rows"] == 40
    assert board.rows == sorted(board.rows)
    assert board.rows[-1] == 40
    assert {8, 16, 24, 32} <= set(board.rows)  # batches of 8 rows, each seen


def test_a_cpu_labels_in_small_batches_unless_rows_are_capped(tiny_model_dir):
    import torch

    from sentiment_ray.label.labeler import CPU_MAX_BATCH_TOKENS, batch_token_budget

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    default = make_cfg(tiny_model_dir, batch_size=None)
    assert batch_token_budget(default, gpu) == default.label.max_batch_tokens == 32768
    assert batch_token_budget(default, cpu) == CPU_MAX_BATCH_TOKENS
    assert batch_token_budget(make_cfg(tiny_model_dir, batch_size=None, max_batch_tokens=1000), cpu) == 1000
    assert batch_token_budget(make_cfg(tiny_model_dir, batch_size=8), cpu) == 32768  # rows capped by the user: theirs


# ----------------------------------------------------------------------------- Ray runs


@pytest.mark.slow
def test_scoring_gives_one_row_per_input_id_across_files_and_formats(clean_run, inputs):
    out, summary = clean_run
    ids = inputs[1]
    table = pa.concat_tables(outputs(out)["predictions"])
    assert sorted(table.column("ID").to_pylist()) == sorted(ids)
    assert len(set(table.column("ID").to_pylist())) == table.num_rows == 120
    probs = np.stack([table.column("p_Positive").to_numpy(), table.column("p_Negative").to_numpy()], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert table.column("pred_label").to_pylist() == [["Positive", "Negative"][i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(table.column("confidence").to_numpy(), probs.max(axis=1), atol=1e-7)
    # Every input column is kept, plus identity and provenance.
    assert {"ID", "sentence", "label", "lang", "source", "source_file", "source_row", "model_name", "adapter_id"} <= set(
        table.column_names
    )
    # submission.csv: ID,label, in input order (files sorted, then rows).
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "ID,label"
    assert [x.split(",")[0] for x in lines[1:]] == ids
    assert summary["rows"] == summary["labelled"] == 120
    assert summary["bad_rows"] == 0
    assert summary["units"] == {"total": UNITS, "labelled_now": UNITS, "done_before": 0}
    assert summary["metrics"]["n"] == 120
    assert set(summary["metrics"]["per_language"]) == {"en", "es", "id", "zh"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["ece"] <= 1.0
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 120
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_rerun_after_completion_does_nothing_and_changed_settings_are_refused(clean_run, inputs, tiny_model_dir):
    from sentiment_ray.label.plan import LabelRunError
    from sentiment_ray.label.recipe import label_dataset

    out, _ = clean_run
    before = outputs(out)
    summary = label_dataset(make_cfg(tiny_model_dir), str(inputs[0] / "in"), str(out))
    assert summary["units"]["labelled_now"] == 0
    assert summary["rows"] == 120
    assert_same_outputs(before, outputs(out))
    changed = make_cfg(tiny_model_dir)
    changed.prompt.instruction = "Is this positive or negative?"
    with pytest.raises(LabelRunError, match=r"(?s)prompt\.instruction.*--overwrite"):
        label_dataset(changed, str(inputs[0] / "in"), str(out))


@pytest.mark.slow
def test_generate_mode_flags_unparsed_rows_with_null_labels(ray_address, tiny_model_dir, inputs, tmp_path):
    from sentiment_ray.label.recipe import label_dataset

    out = tmp_path / "out"
    cfg = make_cfg(tiny_model_dir, mode="generate", max_new_tokens=2)
    summary = label_dataset(cfg, str(inputs[0] / "in"), str(out), rows_per_unit=40)
    table = pa.concat_tables(outputs(out)["predictions"])
    assert sorted(table.column("ID").to_pylist()) == sorted(inputs[1])
    assert table.num_rows == 120
    failed = np.array(table.column("parse_failed").to_pylist())
    labels = table.column("pred_label").to_pylist()
    # A random model seldom starts its answer with a label: those rows are flagged, never guessed.
    assert failed.sum() > 0
    assert summary["parse_failed"] == failed.sum()
    assert all((lab is None) == f for lab, f in zip(labels, failed))
    assert all(isinstance(t, str) for t in table.column("generated_text").to_pylist())
    assert "p_Positive" not in table.column_names
    assert summary["metrics"]["unparsed"] == failed.sum()


@pytest.mark.slow
def test_bad_rows_are_quarantined_and_long_text_is_truncated(ray_address, tiny_model_dir, tmp_path):
    from sentiment_ray.label.recipe import label_dataset

    folder = tmp_path / "in"
    folder.mkdir()
    good = demo_rows(0, 4)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(
        [["ID", "sentence", "label"]] + [[r["ID"], r["sentence"], r["label"]] for r in good]
    )
    (folder / "a.csv").write_bytes(
        buffer.getvalue().encode()
        + b"e1,,Positive\n"
        + b"u1,caf\xe9,Positive\n"
        + b"m1,short row\n"
        + ("long1," + "word " * 300 + ",Negative\n").encode()
    )
    (folder / "b.jsonl").write_text(
        json.dumps({"ID": "n1", "sentence": 42, "label": "Positive"})
        + "\n"
        + json.dumps({"ID": "n2", "sentence": "fine text", "label": "Negative"})
        + "\n"
    )
    summary = label_dataset(make_cfg(tiny_model_dir), str(folder), str(tmp_path / "out"), rows_per_unit=3)
    assert summary["rows"] == 10
    assert summary["labelled"] == 6
    assert summary["bad_rows"] == 4
    assert summary["bad_by_kind"] == {"empty text": 1, "undecodable bytes": 1, "malformed row": 1, "text is not a string": 1}
    quarantined = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(Path(q["file"]).name, q["row"], q["kind"]) for q in quarantined] == [
        ("a.csv", 5, "empty text"),
        ("a.csv", 6, "undecodable bytes"),
        ("a.csv", 7, "malformed row"),
        ("b.jsonl", 1, "text is not a string"),
    ]
    table = pa.concat_tables(outputs(tmp_path / "out")["predictions"])
    truncated = dict(zip(table.column("ID").to_pylist(), table.column("truncated").to_pylist()))
    assert truncated["long1"] is True
    assert summary["truncated"] == sum(truncated.values())
    submission = (tmp_path / "out" / "submission.csv").read_text().splitlines()[1:]
    assert [x.split(",")[0] for x in submission] == [r["ID"] for r in good] + ["long1", "n2"]


@pytest.mark.slow
def test_killed_actor_is_replaced_and_the_output_matches_a_clean_run(clean_run, inputs, tiny_model_dir, tmp_path):
    from sentiment_ray.label.recipe import label_dataset

    out = tmp_path / "out"
    killed = []

    def kill_first_actor():
        deadline = time.time() + 120
        while time.time() < deadline:
            if committed(out):
                pid = markers(out)[0]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, committed(out)))
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_first_actor, daemon=True)
    watcher.start()
    summary = label_dataset(make_cfg(tiny_model_dir), str(inputs[0] / "in"), str(out), rows_per_unit=ROWS_PER_UNIT)
    watcher.join()
    assert killed, "the actor was not killed mid-run"
    assert killed[0][1] < summary["units"]["total"], "the actor was not killed mid-run"
    pids = {m["pid"] for m in markers(out)}
    assert killed[0][0] in pids, "no replacement actor finished the run"
    assert len(pids) >= 2, "no replacement actor finished the run"
    assert_same_outputs(outputs(clean_run[0]), outputs(out))


@pytest.mark.slow
def test_killed_driver_then_rerun_finishes_only_the_rest_with_the_same_output(
    clean_run, ray_address, inputs, tiny_model_dir, tmp_path
):
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(make_cfg(tiny_model_dir).model_dump()))
    command = [
        sys.executable,
        str(REPO_ROOT / "jobs" / "label.py"),
        "--config",
        str(config),
        "--input",
        str(inputs[0] / "in"),
        "--output",
        str(out),
        "--rows-per-unit",
        str(ROWS_PER_UNIT),
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None and not committed(out):
        time.sleep(0.005)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_at_kill = committed(out)
    assert 0 < done_at_kill < UNITS, f"driver not killed mid-run ({done_at_kill} of {UNITS} units done)"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["units"]["total"] == UNITS
    assert 0 < summary["units"]["labelled_now"] < UNITS
    assert summary["rows"] == summary["labelled"] == 120
    assert_same_outputs(outputs(clean_run[0]), outputs(out))


@pytest.mark.slow
def test_scoring_with_a_trained_adapter_agrees_with_the_training_validation(ray_address, tiny_cfg, tmp_path):
    from sentiment_ray.label.recipe import label_dataset
    from sentiment_ray.train.recipe import run_training

    trained = run_training(tiny_cfg)
    run_dir = Path(trained["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())["fine_tuned"]
    validation = pq.read_table(run_dir / "validation_predictions.parquet")
    pq.write_table(validation.select(["ID", "sentence", "label", "lang"]), tmp_path / "val.parquet")

    tiny_cfg.label.batch_size = tiny_cfg.train.eval_batch_size  # same micro-batches as the training scorer
    summary = label_dataset(tiny_cfg, str(tmp_path / "val.parquet"), str(tmp_path / "out"), str(run_dir / "adapter"))
    labelled = pa.concat_tables(outputs(tmp_path / "out")["predictions"])
    assert labelled.column("ID").to_pylist() == validation.column("ID").to_pylist()
    for label in ("Positive", "Negative"):  # labelling gives the calibrated probabilities
        np.testing.assert_allclose(
            labelled.column(f"p_{label}").to_numpy(), validation.column(f"calibrated_p_{label}").to_numpy(), atol=1e-5
        )
    assert labelled.column("pred_label").to_pylist() == validation.column("predicted").to_pylist()
    ours = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert ours["n"] == metrics["n"]
    assert ours["confusion_matrix"] == metrics["confusion_matrix"]
    assert ours["accuracy"] == pytest.approx(metrics["accuracy"])
    assert ours["macro_f1"] == pytest.approx(metrics["macro_f1"])
    # Its ECE is that of the probabilities it gives (calibrated), on these rows.
    from sentiment_ray.metrics import expected_calibration_error

    calibrated = np.stack([validation.column(f"calibrated_p_{label}").to_numpy() for label in ("Positive", "Negative")], axis=1)
    right = validation.column("predicted").to_numpy(zero_copy_only=False) == validation.column("label").to_numpy(
        zero_copy_only=False
    )
    assert ours["ece"] == pytest.approx(expected_calibration_error(calibrated.max(axis=1), right)["ece"], abs=1e-5)
    assert ours["per_language"].keys() == metrics["per_language"].keys()
    for lang, row in metrics["per_language"].items():  # the ECE per language is, again, of other probabilities
        assert {k: v for k, v in ours["per_language"][lang].items() if k != "ece"} == pytest.approx(
            {k: v for k, v in row.items() if k != "ece"}
        )
    assert summary["adapter"].startswith("adapter@")


@pytest.mark.slow
def test_an_input_error_inside_the_actor_stops_the_run_naming_file_and_column(ray_address, tiny_model_dir, tmp_path):
    from sentiment_ray.label.recipe import label_dataset

    (tmp_path / "in.jsonl").write_text(
        json.dumps({"ID": "a", "sentence": "one", "stars": 5})
        + "\n"
        + json.dumps({"ID": "b", "sentence": "two", "stars": "five"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"in\.jsonl: rows 1-2: column 'stars' mixes value types"):
        label_dataset(make_cfg(tiny_model_dir), str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
    # Nothing of the failed unit looks committed.
    assert committed(tmp_path / "out") == 0
    assert not list((tmp_path / "out").glob("predictions/part-*"))


def test_eval_of_a_label_output_reads_gold_labels_as_the_job_did(ray_address, tiny_model_dir, tmp_path):
    """Labels 0/1 mapped by data.label_map: the job's metrics and `sentiment-ray eval` of its
    output folder agree (both go through metrics.evaluate_predictions, the manifest tells eval
    how the job read its gold labels)."""
    from sentiment_ray.cli import main
    from sentiment_ray.eval.layout import METRICS_FILE
    from sentiment_ray.label.recipe import label_dataset

    rows = demo_rows(0, 30)
    codes = [dict(r, label="1" if r["label"] == "Positive" else "0") for r in rows]
    pacsv.write_csv(pa.Table.from_pylist(codes), tmp_path / "coded.csv")
    cfg = make_cfg(tiny_model_dir)
    cfg.data.label_map = {"0": "Negative", "1": "Positive"}
    summary = label_dataset(cfg, str(tmp_path / "coded.csv"), str(tmp_path / "out"))
    assert summary["metrics"]["n"] == 30
    assert summary["metrics"]["rows_without_label"] == 0

    assert main(["eval", "--predictions", str(tmp_path / "out")]) == 0
    job = json.loads((tmp_path / "out" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert evaluated["n"] == job["n"] == 30
    for key in ("accuracy", "macro_f1", "ece", "confusion_matrix", "per_language"):
        assert evaluated[key] == job[key], key
    assert (tmp_path / "out" / "report.html").exists()  # the job's own report, not replaced
    # Both pages name the model, the adapter (none: zero-shot), the input and the date.
    for name in ("report.html", "eval-report.html"):
        page = (tmp_path / "out" / name).read_text()
        assert 'id="run-details"' in page, name
        assert cfg.model.name in page, name
        assert "coded.csv" in page, name
        assert "none (zero-shot)" in page, name
        assert " UTC" in page, name


def test_progress_shows_rows_of_the_total_and_reaches_it_once(ray_address, tiny_model_dir, tmp_path, capfd):
    from sentiment_ray.label.recipe import label_dataset

    pacsv.write_csv(pa.Table.from_pylist(demo_rows(0, 40)), tmp_path / "in.csv")
    summary = label_dataset(make_cfg(tiny_model_dir), str(tmp_path / "in.csv"), str(tmp_path / "out"), rows_per_unit=10)
    assert summary["units"]["total"] == 4
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("labelling ")]
    assert lines
    assert lines[-1].startswith("labelling 40 / 40 rows (100%)")
    assert "bad rows 0" in lines[-1]
    import re

    assert not re.search(r"MapBatches\(Labeler\)\S*: \d+/\d+", err)  # Ray Data's block counter is off
    assert summary["actor_startup_s_max"] > 0
