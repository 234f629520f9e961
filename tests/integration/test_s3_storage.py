"""Object storage for real: a moto S3 server on loopback, found by pyarrow (and Ray Train's
storage, and the jobs' Ray workers) through the standard AWS environment variables; data
reading, quarantine, adapters, run outputs and labelling outputs on it; and credentials that
never show up in logs, manifests, metrics or error messages.

The server runs for the module (`python -m moto.server`, from `moto[server]` in the dev
extra). The end-to-end test runs `jobs/train.py` and then `jobs/label.py` as the user would,
each in a subprocess with its own local Ray cluster, all data and outputs in S3.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from object_store import (
    check_globs_and_quarantine,
    demo_rows,
    free_port,
    last_json_line,
    run_job,
    start_server,
    stop_server,
    to_csv,
    write_tiny_config,
)

from sentiment_ray import provenance as manifest
from sentiment_ray.config import ConfigError, HFDatasetConfig, load_config
from sentiment_ray.io import uris as storage
from sentiment_ray.io.files import expand_paths, fingerprint
from sentiment_ray.io.readers import read_chunks
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.values import DataError
from sentiment_ray.labels import LabelSet
from sentiment_ray.train.data import load_labelled

pytest.importorskip("moto", reason="moto[server] (dev extra) runs the S3 server")
boto3 = pytest.importorskip("boto3")

BUCKET = "sentiment-ray-test"
# Recognisable, so a leak anywhere is found by a plain substring search.
SECRET = "SeCrEt-" + uuid.uuid4().hex
ACCESS_KEY = "AKIATESTONLY" + uuid.uuid4().hex[:8].upper()


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]
    client: object

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)
        return f"s3://{BUCKET}/{key}"

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the AWS variables that point at it, set in this
    process for the module (and handed to the job subprocesses)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    server = start_server(
        ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        f"{endpoint}/moto-api/",
        tmp_path_factory.mktemp("moto") / "moto.log",
    )
    patch = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            patch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield S3(endpoint, env, client)
    finally:
        patch.undo()
        stop_server(server)


def assert_no_secret(where: str, text: str | bytes) -> None:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    assert SECRET not in text, f"the secret access key leaked into {where}"


# ============================================================================ redaction (pure)


def test_redact_masks_uri_credentials_query_secrets_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-" + "x" * 20)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # short values are not masked
    text = (
        "s3://AKIA123:abc/def@bucket/x.csv gs://user@b/y "
        "https://h/o?X-Amz-Credential=AK%2F1&X-Amz-Signature=deadbeef&region=eu-west-1 "
        "s3://b/k?access_key=AK&secret_key=SK&endpoint_override=http://127.0.0.1:9000 "
        f"token tok-{'x' * 20} false"
    )
    out = storage.redact(text)
    for secret in ("AKIA123", "abc/def", "user@", "AK%2F1", "deadbeef", "=AK&", "=SK", "tok-xxxx"):
        assert secret not in out
    for kept in ("bucket/x.csv", "region=eu-west-1", "endpoint_override=http://127.0.0.1:9000", " false"):
        assert kept in out
    assert storage.redact("s3://bucket/runs/demo http://127.0.0.1:5000/a") == "s3://bucket/runs/demo http://127.0.0.1:5000/a"
    nested = storage.redact_obj({"p": ["s3://K:S@b/x"], "n": 1, "t": ("ok",)})
    assert nested == {"p": ["s3://***@b/x"], "n": 1, "t": ("ok",)}


def test_uris_with_inline_credentials_are_refused_without_echoing_them(tmp_path):
    uri = f"s3://{ACCESS_KEY}:{SECRET}@{BUCKET}/train.csv"
    with pytest.raises(ConfigError) as config_err:
        load_config("demo", [f"data.train_path={uri}"])
    with pytest.raises(ConfigError) as storage_err:
        load_config("demo", [f"run.storage_path=s3://{BUCKET}/runs?secret_key={SECRET}"])
    with pytest.raises(DataError) as data_err:
        expand_paths(uri)
    with pytest.raises(storage.StorageError) as folder_err:
        with storage.local_folder(f"s3://{ACCESS_KEY}:{SECRET}@{BUCKET}/adapter"):
            pass
    for err in (config_err, storage_err, data_err, folder_err):
        assert "carries credentials" in str(err.value)
        assert_no_secret("an error message", str(err.value))


def test_manifests_and_json_outputs_mask_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    record = manifest.build_manifest(
        {"data": {"train_path": f"s3://k:{SECRET}@b/x"}, "note": f"key {SECRET}"},
        data_fingerprint=None,
        backend="hf",
        device="cpu",
        code_version=None,
        extra={"run_dir": f"s3://b/runs?session_token={SECRET}"},
    )
    assert_no_secret("build_manifest", json.dumps(record))
    Storage(str(tmp_path)).write_json("m.json", {"message": f"failed with {SECRET}", "nested": [{"k": SECRET}]})
    assert_no_secret("write_json", (tmp_path / "m.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text())["nested"] == [{"k": "***"}]


# ============================================================================ data on S3


def test_data_globs_validation_quarantine_and_fingerprint_on_s3(s3, tmp_path):
    s3.put("data/_SUCCESS", b"")  # a marker, not data: skipped by expand_paths
    files = check_globs_and_quarantine(s3, f"s3://{BUCKET}")

    # The same bytes under another name and place give the same fingerprint locally and in S3.
    (tmp_path / "part-1.csv").write_bytes(s3.get("data/part-1.csv"))
    (tmp_path / "part-2.csv").write_bytes(s3.get("data/part-2.csv"))
    assert fingerprint(files) == fingerprint(str(tmp_path))


def test_errors_for_missing_objects_name_the_uri_and_never_the_secret(s3):
    errors = []
    for call in (
        lambda: expand_paths(f"s3://{BUCKET}/nowhere/train.csv"),
        lambda: expand_paths(f"s3://{BUCKET}/nowhere/*.parquet"),
        lambda: list(read_chunks(f"s3://{BUCKET}/nowhere/train.csv")),
        lambda: list(read_chunks(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.csv")),
    ):
        with pytest.raises(DataError) as err:
            call()
        errors.append(str(err.value))
    assert "no such file" in errors[0]
    assert "no files match" in errors[1]
    assert "no such file" in errors[2]
    for message in errors:
        assert message.startswith("s3://")
        assert_no_secret("a DataError", message)


def test_an_object_store_write_fault_is_one_line_naming_the_uri_and_never_the_secret(s3):
    from sentiment_ray.io.uris import StorageIOError

    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    with pytest.raises(StorageIOError) as err:
        Storage(missing).write_json("summary.json", {"a": 1})
    message = str(err.value)
    # pyarrow checks the bucket when making the folder: "<uri>: cannot create the folder: Bucket ... not found"
    assert message.startswith(f"{missing}")
    assert ": cannot " in message
    assert "not found" in message
    assert "\n" not in message
    assert_no_secret("a StorageIOError", message)


def test_the_lock_on_an_object_store_admits_one_job(s3):
    """No create-if-absent on S3 through pyarrow: write, settle, read back; a second job is
    refused naming the first, and the lock is gone after release."""
    from sentiment_ray.io.lease import LOCK_FILE, Lease, LockHeld

    folder = Storage(f"s3://{BUCKET}/locked-{uuid.uuid4().hex[:6]}")
    with Lease(folder, purpose="label", settle_s=0.2) as first:
        assert not first.local
        assert json.loads(folder.read_bytes(LOCK_FILE))["owner"] == first.token
        with pytest.raises(LockHeld, match=f"pid {os.getpid()} on host"):
            Lease(folder, purpose="label", settle_s=0.2).acquire()
        first.renew()
        first.check()
    assert not folder.exists(LOCK_FILE)


def test_local_folder_copies_a_remote_folder_for_the_block_only(s3):
    s3.put("adapters/a/adapter_config.json", b"{}")
    s3.put("adapters/a/sub/tokenizer.json", b"[1]")
    with storage.local_folder(f"s3://{BUCKET}/adapters/a") as local:
        assert Path(local, "adapter_config.json").read_bytes() == b"{}"
        assert Path(local, "sub", "tokenizer.json").read_bytes() == b"[1]"
    assert not Path(local).exists()
    with pytest.raises(storage.StorageError, match="no such folder"):
        with storage.local_folder(f"s3://{BUCKET}/adapters/missing"):
            pass
    with storage.local_folder("relative/dir") as same:  # local paths pass through
        assert same == "relative/dir"


def test_a_saved_hf_dataset_in_s3_loads_through_the_s3_extra(s3, tmp_path):
    """The `s3` extra (s3fs) is what `datasets.load_from_disk("s3://...")` goes through; it
    finds the server and the keys through the same AWS variables as pyarrow."""
    pytest.importorskip("s3fs", reason="the s3 extra")
    import datasets

    local = tmp_path / "reviews"
    rows = demo_rows(12)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": [r["sentence"] for r in rows], "stars": [r["label"] for r in rows]})}
    ).save_to_disk(str(local))
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.put(f"datasets/reviews/{file.relative_to(local).as_posix()}", file.read_bytes())

    cfg = load_config("demo", ["data.text_column=text", "data.label_column=stars"])
    source = HFDatasetConfig(name=f"s3://{BUCKET}/datasets/reviews", split="train", load_from_disk=True)
    loaded = load_labelled(source, cfg.data, LabelSet(cfg.prompt.labels))
    assert loaded.table.column("sentence").to_pylist() == [r["sentence"] for r in rows]
    assert loaded.table.column("label").to_pylist() == [r["label"] for r in rows]
    with pytest.raises(DataError) as err:
        load_labelled(
            HFDatasetConfig(name=f"s3://{BUCKET}/datasets/nothing", split="train", load_from_disk=True),
            cfg.data,
            LabelSet(cfg.prompt.labels),
        )
    assert str(err.value).startswith(f"hf:s3://{BUCKET}/datasets/nothing:train: cannot load the dataset")
    assert_no_secret("a DataError", str(err.value))


# ============================================================================ train -> label on S3


@pytest.mark.slow
def test_train_then_label_end_to_end_on_s3_without_leaking_the_secret(s3, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train_rows = demo_rows(120)
    s3.put("in/train.csv", to_csv(train_rows + [dict(train_rows[0], ID="bad-1", label="Neutral")]))
    cfg_path = write_tiny_config(
        tmp_path / "tiny-s3.yaml", tiny_model_dir, f"s3://{BUCKET}/in/train.csv", f"s3://{BUCKET}/runs", "tiny-s3"
    )
    env = {**os.environ, **s3.env, "SENTIMENT_RAY_GIT_COMMIT": "test"}

    train = run_job(["jobs/train.py", "--config", str(cfg_path)], env)
    assert train.returncode == 0, train.stderr[-4000:]
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    run_dir = f"s3://{BUCKET}/runs/tiny-s3"
    assert summary["run_dir"] == run_dir
    assert summary["adapter"] == f"{run_dir}/adapter"
    assert summary["steps"] == 2
    run_keys = s3.keys("runs/tiny-s3/")
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.json",
        "manifest.json",
        "quarantine.jsonl",
        "validation_predictions.parquet",
    ):
        assert f"runs/tiny-s3/{name}" in run_keys, run_keys
    assert any("/checkpoint-" in k for k in run_keys), "Ray Train's checkpoint is in S3"
    assert json.loads(s3.get("runs/tiny-s3/quarantine.jsonl"))["values"]["ID"] == "bad-1"
    run_manifest = json.loads(s3.get("runs/tiny-s3/manifest.json"))
    assert run_manifest["run_dir"] == run_dir
    assert run_manifest["data_files"]["train"] == [f"s3://{BUCKET}/in/train.csv"]

    # Labelling: Parquet + CSV inputs in S3, the adapter from S3, the outputs into S3.
    unlabelled = demo_rows(50, start=500)
    pq_buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(unlabelled[:30]), pq_buffer)
    s3.put("unlabelled/part-0.parquet", pq_buffer.getvalue().to_pybytes())
    s3.put("unlabelled/part-1.csv", to_csv(unlabelled[30:]))
    label = run_job(
        [
            "jobs/label.py",
            "--config",
            str(cfg_path),
            "--input",
            f"s3://{BUCKET}/unlabelled/",
            "--adapter",
            f"{run_dir}/adapter",
            "--output",
            f"s3://{BUCKET}/labels",
            "--rows-per-unit",
            "20",
            "label.write_submission=true",
        ],
        env,
    )
    assert label.returncode == 0, label.stderr[-4000:]
    label_summary = json.loads(label.stdout.strip().splitlines()[-1])
    assert label_summary["rows"] == label_summary["labelled"] == 50
    assert label_summary["adapter"].startswith("adapter@")
    shards = [k for k in s3.keys("labels/predictions/") if k.endswith(".parquet")]
    ids = []
    for key in shards:
        ids.extend(pq.read_table(pa.BufferReader(s3.get(key))).column("ID").to_pylist())
    assert sorted(ids) == sorted(r["ID"] for r in unlabelled)  # every input ID exactly once
    submission = s3.get("labels/submission.csv").decode().splitlines()
    assert submission[0] == "ID,label"
    assert [line.split(",")[0] for line in submission[1:]] == [r["ID"] for r in unlabelled]
    assert label_summary["metrics"]["n"] == 50

    # A failing read of a missing object: a clean error naming the URI, not the secret.
    missing = run_job(
        [
            "jobs/label.py",
            "--config",
            str(cfg_path),
            "--input",
            f"s3://{BUCKET}/nowhere/*.csv",
            "--output",
            f"s3://{BUCKET}/labels-missing",
        ],
        env,
        timeout=300,
    )
    assert missing.returncode == 1
    assert f"s3://{BUCKET}/nowhere/*.csv: no files match" in missing.stderr

    for name, proc in (("train", train), ("label", label), ("failing label", missing)):
        assert_no_secret(f"{name} stdout", proc.stdout)
        assert_no_secret(f"{name} stderr", proc.stderr)
    for key in (
        "runs/tiny-s3/manifest.json",
        "runs/tiny-s3/metrics.json",
        "labels/_manifest.json",
        "labels/summary.json",
        "labels/metrics.json",
    ):
        assert_no_secret(key, s3.get(key))
    assert run_manifest["config"]["run"]["storage_path"] == f"s3://{BUCKET}/runs"


@pytest.mark.slow
def test_tune_experiment_and_best_adapter_live_in_s3(s3, tiny_model_dir, tmp_path):
    s3.put("in/tune.csv", to_csv(demo_rows(80)))
    cfg_path = write_tiny_config(
        tmp_path / "tune-s3.yaml",
        tiny_model_dir,
        f"s3://{BUCKET}/in/tune.csv",
        f"s3://{BUCKET}/runs",
        "tiny-s3",
        tune={
            "num_samples": 2,
            "max_concurrent_trials": 1,
            "scheduler": "fifo",
            "experiment_name": "tune-s3",
            "metric": "val_accuracy",
            "search_space": {"lora.r": {"type": "choice", "values": [2, 4]}},
        },
    )
    env = {**os.environ, **s3.env}
    env.pop("RAY_ADDRESS", None)
    tune = run_job(["jobs/tune.py", "--config", str(cfg_path), "--num-cpus", "2"], env)
    assert tune.returncode == 0, tune.stderr[-4000:]
    summary = last_json_line(tune.stdout)
    exp = f"s3://{BUCKET}/runs/tune-s3"
    assert summary["experiment"] == exp
    assert summary["best_dir"] == f"{exp}/best"
    assert summary["outcomes"].get("completed") == 2, summary
    keys = s3.keys("runs/tune-s3/")
    for name in ("trials.csv", "metric_vs_step.png", "best/adapter/adapter_config.json", "best/trial.json"):
        assert f"runs/tune-s3/{name}" in keys, keys
    assert_no_secret("tune stdout", tune.stdout)
    assert_no_secret("tune stderr", tune.stderr)
