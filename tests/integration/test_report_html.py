"""The HTML report (sentiment_ray/report/html.py, `sentiment-ray eval`): the pages are rendered
in headless Chromium (Debian's `chromium`; `make test` installs it through
scripts/install_browser.sh) and the rendered DOM is checked for the expected elements: metrics
rows, per-language rows, the confusion-matrix and reliability images (decoded, non-zero
width), the trial curves and trials table of a tune experiment."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.cli import main
from sentiment_ray.eval import recipe as evaluate
from sentiment_ray.io.storage import Storage
from sentiment_ray.metrics import classification_report
from sentiment_ray.report import html

LABELS = ["Positive", "Negative"]


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render(page: Path) -> str:
    """The DOM after Chromium loaded the page and ran its scripts."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium, or run scripts/install_browser.sh)")
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "<html" in out.stdout, out.stderr[-3000:]
    return out.stdout


class Dom(HTMLParser):
    """Start tags with their attributes, each <tr> with the id of its table and its cells' text."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.rows: dict[str, list[tuple[dict, list[str]]]] = {}
        self._tables: list[str] = []
        self._row: tuple[dict, list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "table":
            self._tables.append(attrs.get("id", ""))
        elif tag == "tr" and self._tables:
            self._row = (attrs, [])
            self.rows.setdefault(self._tables[-1], []).append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table" and self._tables:
            self._tables.pop()
        elif tag in ("td", "th") and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def by_id(self, element_id: str) -> tuple[str, dict]:
        found = [e for e in self.elements if e[1].get("id") == element_id]
        assert found, f"no element with id {element_id!r}"
        return found[0]


def _assert_rendered_image(dom: Dom, element_id: str, alt_word: str) -> None:
    tag, attrs = dom.by_id(f"{element_id}-img")
    assert tag == "img"
    assert alt_word.lower() in attrs["alt"].lower()
    assert attrs["src"].startswith("data:image/")
    assert int(attrs.get("data-rendered-width", "0")) > 100, f"{element_id} did not render: {attrs.get('data-rendered-width')}"
    assert dom.by_id(element_id)[0] == "figure"


def _predictions(n: int = 240, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    gold = rng.choice(LABELS, n).tolist()
    p_pos = np.clip(np.where(np.array(gold) == "Positive", 0.7, 0.3) + rng.normal(0, 0.25, n), 0.01, 0.99)
    pred = ["Positive" if p > 0.5 else "Negative" for p in p_pos]
    langs = rng.choice(["en", "es", "zh"], n).tolist()
    return {
        "ID": list(range(n)),
        "label": gold,
        "lang": langs,
        "pred_label": pred,
        "p_Positive": p_pos.tolist(),
        "p_Negative": (1 - p_pos).tolist(),
        "confidence": np.maximum(p_pos, 1 - p_pos).tolist(),
    }


def test_label_output_report_renders_metrics_languages_confusion_and_reliability(tmp_path):
    data = _predictions()
    folder = tmp_path / "label-run"
    (folder / "predictions").mkdir(parents=True)
    half = len(data["ID"]) // 2
    for i, part in enumerate((slice(0, half), slice(half, None))):  # two shards, like a label job's units
        pq.write_table(pa.table({k: v[part] for k, v in data.items()}), folder / "predictions" / f"part-{i:05d}.parquet")
    pq.write_table(
        pa.table({"ID": [999], "label": ["Positive"]}), folder / "predictions" / "part-00002.parquet"
    )  # all quarantined

    assert main(["eval", "--predictions", str(folder)]) == 0
    page = folder / evaluate.REPORT_FILE
    dom = Dom(render(page))

    expected = classification_report(data["label"], data["pred_label"], LABELS, data["lang"])
    metrics = {attrs["data-metric"]: cells[1] for attrs, cells in dom.rows["metrics"] if "data-metric" in attrs}
    assert metrics["n"] == str(len(data["ID"]))
    assert float(metrics["accuracy"]) == pytest.approx(expected["accuracy"], abs=1e-4)
    assert float(metrics["macro_f1"]) == pytest.approx(expected["macro_f1"], abs=1e-4)
    assert {"ece", "f1_Positive", "f1_Negative"} <= set(metrics)
    languages = {attrs["data-lang"]: cells for attrs, cells in dom.rows["per-language"] if "data-lang" in attrs}
    assert set(languages) == {"en", "es", "zh"}
    for lang, cells in languages.items():
        assert int(cells[1]) == expected["per_language"][lang]["n"]
        assert float(cells[2]) == pytest.approx(expected["per_language"][lang]["accuracy"], abs=1e-4)
    _assert_rendered_image(dom, "confusion-matrix", "confusion matrix")
    _assert_rendered_image(dom, "reliability-diagram", "reliability")
    saved = json.loads((folder / evaluate.METRICS_FILE).read_text())
    assert saved["n"] == len(data["ID"])
    assert saved["rows_without_label"] == 0
    # The page says what it is about: the predictions it read and when it was written.
    details = {attrs["data-detail"]: cells[-1] for attrs, cells in dom.rows["run-details"]}
    assert details["predictions"] == str(folder)
    assert details["date"].endswith("UTC")


def test_csv_predictions_without_probabilities_or_languages(tmp_path):
    """A plain CSV with gold + predicted labels (lower-case gold, one unknown): no reliability
    diagram, a note instead of the language table, unknown gold labels counted."""
    import csv

    path = tmp_path / "preds.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "predicted"])
        writer.writerows([["positive", "Positive"], ["negative", "Positive"], ["Negative", "Negative"], ["???", "Negative"]])
    summary = evaluate.evaluate_to_report(predictions=str(path), output=str(tmp_path / "out"), labels=LABELS)
    assert summary["n"] == 3
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["ece"] is None
    text = (tmp_path / "out" / evaluate.REPORT_FILE).read_text()
    assert 'id="confusion-matrix"' in text
    assert 'id="reliability-diagram"' not in text
    assert 'id="per-language"' in text
    assert "No language column" in text
    with pytest.raises(evaluate.ReportError, match="gold label column 'gold'"):
        evaluate.evaluate_to_report(predictions=str(path), label_column="gold")


def _fake_experiment(root: Path) -> tuple[Path, list[dict]]:
    """An experiment folder as tune.recipe.finalize leaves it: trials.parquet, histories, best/."""
    from sentiment_ray.tune import results as tune_report

    exp = root / "exp"
    (exp / "trial_histories").mkdir(parents=True)
    records = []
    for i, (lr, curve, status) in enumerate(
        [
            (1e-3, [0.5, 0.6, 0.7, 0.8], "TERMINATED"),
            (1e-5, [0.4, 0.42], "TERMINATED"),
            (3e-4, [0.5, 0.55, 0.62, 0.66], "TERMINATED"),
        ]
    ):
        trial_id = f"t{i}"
        history = [{"step": 2 * (k + 1), "val_macro_f1": v, "time_this_iter_s": 1.0} for k, v in enumerate(curve)]
        (exp / "trial_histories" / f"{trial_id}.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        records.append(
            {
                "trial_id": trial_id,
                "status": status,
                "values": {"train.learning_rate": lr},
                "max_steps": 8,
                "history": history,
                "run_dir": str(exp / trial_id),
                "adapter": "a",
                "finished": len(curve) == 4,
            }
        )
    rows = tune_report.trial_rows(records, "val_macro_f1", "max", ["train.learning_rate"])
    tune_report.write_table(rows, Storage(str(exp)), "trials.csv", "trials.parquet")
    (exp / "sentiment_ray_tune.json").write_text(
        json.dumps({"config": {"tune": {"metric": "val_macro_f1", "mode": "max", "experiment_name": "lr-search"}}})
    )
    (exp / "best").mkdir()
    (exp / "best" / "trial.json").write_text(json.dumps({"trial_id": "t0"}))
    data = _predictions(60, seed=1)
    report = classification_report(data["label"], data["pred_label"], LABELS, data["lang"])
    (exp / "best" / "metrics.json").write_text(json.dumps({"fine_tuned": report}))
    return exp, rows


def test_tune_experiment_report_renders_trial_curves_and_table(tmp_path):
    exp, rows = _fake_experiment(tmp_path)
    assert {r["outcome"] for r in rows} == {"completed", "stopped_by_scheduler"}
    assert main(["eval", "--experiment", str(exp)]) == 0
    dom = Dom(render(exp / evaluate.REPORT_FILE))
    _assert_rendered_image(dom, "trial-curves", "trial curves")
    trials = {attrs["data-trial"]: attrs for attrs, _ in dom.rows["trials"] if "data-trial" in attrs}
    assert set(trials) == {"t0", "t1", "t2"}
    assert trials["t0"].get("class") == "best"
    assert "class" not in trials["t1"]
    # The best trial's validation metrics follow, with its confusion matrix.
    assert any(a.get("data-metric") == "accuracy" for a, _ in dom.rows["metrics"])
    _assert_rendered_image(dom, "confusion-matrix", "confusion matrix")
    assert "<title>Tune experiment lr-search</title>" in (exp / evaluate.REPORT_FILE).read_text()


def test_tune_report_rendered_from_records_in_memory(tmp_path):
    """tune.recipe.finalize renders the page from the records and rows it holds in memory."""
    from sentiment_ray.tune import results as tune_report

    exp, rows = _fake_experiment(tmp_path)
    records, _, _ = evaluate.experiment_records(str(exp))
    text = html.tune_report_html(
        records,
        rows,
        metric="val_macro_f1",
        mode="max",
        best=tune_report.best_row(rows, "val_macro_f1", "max"),
        title="Tune experiment in-memory",
    )
    assert 'id="trial-curves"' in text
    assert 'data-trial="t2"' in text
    assert "Tune experiment in-memory" in text
    assert len(text.encode()) < 2_000_000
