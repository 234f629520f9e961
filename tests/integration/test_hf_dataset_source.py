"""Hugging Face datasets as a data source (`data.train_dataset` / `data.validation_dataset`),
offline: a small dataset built here with 0/1 ClassLabel labels, saved with `save_to_disk`
and read back through the same validation as files; a hub id checked to reach
`datasets.load_dataset(name, config, split=...)` (patched: no network here)."""

from __future__ import annotations

import json

import datasets
import pytest

from sentiment_ray.config import ConfigError, ExperimentConfig, HFDatasetConfig, load_config
from sentiment_ray.io.values import DataError
from sentiment_ray.labels import LabelSet
from sentiment_ray.train.data import load_labelled

IMDB_MAP = {"0": "Negative", "1": "Positive"}
LABELS = LabelSet(["Positive", "Negative"])


def reviews(n: int, *, bad_label_at: int | None = None) -> dict:
    rows = {
        "text": [f"review number {i}: {'great' if i % 2 else 'awful'} film" for i in range(n)],
        "label": [i % 2 for i in range(n)],
    }
    if bad_label_at is not None:
        rows["label"][bad_label_at] = 7
    return rows


@pytest.fixture(scope="module")
def imdb_like(tmp_path_factory) -> str:
    """A DatasetDict like IMDB's (text, ClassLabel neg/pos), saved to disk."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    folder = tmp_path_factory.mktemp("imdb-like") / "imdb"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(reviews(40), features=features),
            "test": datasets.Dataset.from_dict(reviews(10), features=features),
        }
    ).save_to_disk(str(folder))
    return str(folder)


def data_cfg(**values):
    return ExperimentConfig(data={"text_column": "text", "label_map": IMDB_MAP, **values}).data


def test_a_saved_dataset_loads_with_labels_mapped_through_label_map(imdb_like):
    source = HFDatasetConfig(name=imdb_like, split="train", load_from_disk=True)
    loaded = load_labelled(source, data_cfg(train_dataset=source.model_dump()), LABELS)
    assert len(loaded) == 40
    assert loaded.files == [f"hf:{imdb_like}:train"]
    assert loaded.table.column("label").to_pylist()[:4] == ["Negative", "Positive", "Negative", "Positive"]
    assert loaded.table.column("sentence").to_pylist()[1] == "review number 1: great film"
    assert loaded.table.column("source_row").to_pylist()[:2] == [1, 2]
    # The fingerprint is of the content: the same split again gives the same one, another split another.
    again = load_labelled(source, data_cfg(), LABELS)
    test = load_labelled(HFDatasetConfig(name=imdb_like, split="test", load_from_disk=True), data_cfg(), LABELS)
    assert loaded.fingerprint() == again.fingerprint() != test.fingerprint()
    assert len(loaded.fingerprint()) == 64


def test_bad_rows_are_named_by_dataset_split_and_row_or_quarantined(tmp_path):
    folder = tmp_path / "bad"
    datasets.Dataset.from_dict(reviews(12, bad_label_at=4)).save_to_disk(str(folder))
    source = HFDatasetConfig(name=str(folder), split="train", load_from_disk=True)
    with pytest.raises(DataError, match=rf"^hf:{folder}:train: row 5: unknown label \('7'"):
        load_labelled(source, data_cfg(), LABELS)

    quarantine = tmp_path / "q.jsonl"
    loaded = load_labelled(source, data_cfg(on_bad_rows="skip"), LABELS, quarantine_path=str(quarantine))
    assert len(loaded) == 11
    assert loaded.bad_rows.by_reason == {"unknown label": 1}
    entry = json.loads(quarantine.read_text())
    assert entry["file"] == f"hf:{folder}:train"
    assert entry["row"] == 5
    assert entry["values"]["label"] == "7"


def test_missing_split_column_or_folder_is_a_clear_error(imdb_like, tmp_path):
    with pytest.raises(DataError, match=r"no split 'validation' .*splits: \['test', 'train'\]"):
        load_labelled(HFDatasetConfig(name=imdb_like, split="validation", load_from_disk=True), data_cfg(), LABELS)
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentence'\]; columns found: \['text', 'label'\]"):
        load_labelled(HFDatasetConfig(name=imdb_like, load_from_disk=True), ExperimentConfig().data, LABELS)
    with pytest.raises(DataError, match=rf"^hf:{tmp_path}/nowhere:train: cannot load the dataset"):
        load_labelled(HFDatasetConfig(name=str(tmp_path / "nowhere"), load_from_disk=True), data_cfg(), LABELS)


def test_a_hub_id_goes_to_load_dataset_with_config_split_and_revision(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, *, split=None, revision=None):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_dict(reviews(6))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = load_config("mistral7b_imdb")
    loaded = load_labelled(cfg.data.train_dataset, cfg.data, LabelSet(cfg.prompt.labels))
    assert calls == [("imdb", None, "train", None)]
    assert len(loaded) == 6
    assert loaded.files == ["hf:imdb:train"]
    source = HFDatasetConfig(name="stanfordnlp/imdb", config="plain_text", split="test[:10]", revision="main")
    load_labelled(source, cfg.data, LABELS)
    assert calls[-1] == ("stanfordnlp/imdb", "plain_text", "test[:10]", "main")
    assert source.describe() == "hf:stanfordnlp/imdb/plain_text:test[:10]"


def test_the_training_splits_come_from_the_dataset_sources(imdb_like, tmp_path):
    from sentiment_ray.train.data import load_splits

    cfg = ExperimentConfig(
        data={
            "train_dataset": {"name": imdb_like, "split": "train", "load_from_disk": True},
            "validation_dataset": {"name": imdb_like, "split": "test", "load_from_disk": True},
            "text_column": "text",
            "label_map": IMDB_MAP,
        }
    )
    splits = load_splits(cfg, LABELS, str(tmp_path))
    assert splits.train.num_rows == 40
    assert splits.validation.num_rows == 10
    assert splits.files == {"train": [f"hf:{imdb_like}:train"], "validation": [f"hf:{imdb_like}:test"]}
    assert set(splits.fingerprints) == {"train", "validation"}
    # Without a validation source, validation is split off the training dataset.
    cfg.data.validation_dataset = None
    splits = load_splits(cfg, LABELS, str(tmp_path))
    assert splits.train.num_rows + splits.validation.num_rows == 40
    assert splits.validation.num_rows == 4


def test_config_takes_one_source_per_split_and_validates_the_dataset_fields():
    with pytest.raises(ConfigError, match="set data.train_path or data.train_dataset, not both"):
        load_config("demo", ["data.train_dataset={name: imdb}"])
    with pytest.raises(ConfigError, match=r"data.train_dataset.name: Field required"):
        load_config("demo", ['data.train_path=""', "data.train_dataset={split: train}"])
    with pytest.raises(ConfigError, match=r"data.validation_dataset.splits: unknown field"):
        load_config("demo", ["data.validation_dataset={name: imdb, splits: test}"])
    cfg = load_config("mistral7b_imdb")
    assert cfg.data.train_path == ""
    assert cfg.data.train_dataset == HFDatasetConfig(name="imdb", split="train")
    assert cfg.data.label_map == IMDB_MAP
    assert cfg.data.text_column == "text"
    assert LabelSet(cfg.prompt.labels).resolve(1, cfg.data.label_map) == ("Positive", None)
