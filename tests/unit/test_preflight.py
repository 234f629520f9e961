"""The training driver's checks before Ray starts (train/preflight.py): the worker's own data
loading on a small input, the header and a sample of a large one, the model's whereabouts."""

from __future__ import annotations

import pytest

from sentiment_ray.config import load_config
from sentiment_ray.io.values import DataError
from sentiment_ray.models import ModelNotFoundError
from sentiment_ray.train import preflight


def _csv(path, rows: int, bad_at: int | None = None) -> str:
    lines = ["ID,sentence,label"]
    for i in range(1, rows + 1):
        label = "Neutral" if i == bad_at else ("Positive" if i % 2 else "Negative")
        lines.append(f"r{i},sentence number {i},{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_a_small_input_is_read_whole_and_split_as_the_worker_will(tmp_path):
    cfg = load_config("demo", [f"data.train_path={_csv(tmp_path / 'a.csv', 400)}", "data.validation_fraction=0.25"])
    checked = preflight.check_data(cfg)
    assert checked.whole
    assert (checked.train_rows, checked.validation_rows) == (300, 100)
    assert checked.describe().startswith("data: 300 training rows, 100 validation rows (")

    cfg = load_config("demo", [f"data.train_path={_csv(tmp_path / 'b.csv', 400, bad_at=390)}"])
    with pytest.raises(DataError, match=r"b\.csv: row 390 \(line 391\): unknown label"):
        preflight.check_data(cfg)
    cfg.data.on_bad_rows, cfg.data.quarantine_path = "skip", str(tmp_path / "never-written.jsonl")
    checked = preflight.check_data(cfg)
    assert checked.bad_rows == 1
    assert "1 bad rows will be quarantined" in checked.describe()
    assert not (tmp_path / "never-written.jsonl").exists()  # the driver writes nothing


def test_a_large_input_is_checked_by_its_header_and_first_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "WHOLE_FILE_BYTES", 1)
    monkeypatch.setattr(preflight, "SAMPLE_ROWS", 100)
    late = load_config("demo", [f"data.train_path={_csv(tmp_path / 'late.csv', 400, bad_at=390)}"])
    checked = preflight.check_data(late)
    assert not checked.whole
    assert checked.sampled_rows == 100
    assert "first 100 rows checked" in checked.describe()
    early = load_config("demo", [f"data.train_path={_csv(tmp_path / 'early.csv', 400, bad_at=50)}"])
    with pytest.raises(DataError, match=r"early\.csv: row 50 "):
        preflight.check_data(early)
    (tmp_path / "cols.csv").write_text("text,label\nx,Positive\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentence'\]"):
        preflight.check_data(load_config("demo", [f"data.train_path={tmp_path / 'cols.csv'}"]))


def test_the_model_must_be_here_unless_the_driver_joins_a_cluster(tmp_path, monkeypatch):
    data = _csv(tmp_path / "a.csv", 40)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(ModelNotFoundError, match="model folder '/nowhere/model' does not exist"):
        preflight.check_run(load_config("demo", ["model.name=/nowhere/model", f"data.train_path={data}"]))
    joined = preflight.check_run(
        load_config("demo", ["model.name=/nowhere/model", f"data.train_path={data}", "run.ray_address=auto"])
    )
    assert joined.warnings
    assert "the training workers must have it" in joined.warnings[0]
    hub = preflight.check_run(load_config("demo", ["model.name=org/some-model", f"data.train_path={data}"]))
    assert hub.model == "hub:org/some-model"
    assert not hub.warnings


def test_files_of_a_training_folder_that_are_not_read_are_a_warning(tmp_path):
    (tmp_path / "data").mkdir()
    _csv(tmp_path / "data" / "a.csv", 40)
    (tmp_path / "data" / "more.tsv").write_text("ID\tsentence\tlabel\n", encoding="utf-8")
    checked = preflight.check_data(load_config("demo", [f"data.train_path={tmp_path / 'data'}"]))
    assert checked.train_rows + checked.validation_rows == 40
    assert [w.split(" (not ")[0] for w in checked.warnings] == [f"{tmp_path / 'data'}: 1 file there is not read"]
    assert checked.warnings[0].endswith("): more.tsv")
