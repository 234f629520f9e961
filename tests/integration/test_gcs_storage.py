"""gs:// by the same mechanism as s3://: a GCS emulator on loopback (`gcp-storage-emulator`
from the dev extra, the JSON API that Arrow's GCS client speaks), found through
`CLOUD_STORAGE_EMULATOR_ENDPOINT` (google-cloud-cpp's variable, read inside pyarrow, so by
Ray Train's storage and the jobs' Ray workers too). URIs are `gs://anonymous@bucket/...`,
Arrow's form for "no credentials" (an emulator has none to check); real buckets take
GOOGLE_APPLICATION_CREDENTIALS or the metadata server instead.

The end-to-end test runs `jobs/train.py` then `jobs/label.py` as tests/integration/test_s3_storage.py
does, with data, Ray Train's checkpoints, the adapter and the predictions in the emulator."""

from __future__ import annotations

import os
from dataclasses import dataclass

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

from sentiment_ray.config import ConfigError, load_config
from sentiment_ray.io import uris as storage
from sentiment_ray.io.files import expand_paths
from sentiment_ray.io.values import DataError

pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator (dev extra) runs the GCS server")

BUCKET = "sentiment-ray-gcs"
ROOT = f"gs://anonymous@{BUCKET}"


@dataclass
class GCS:
    endpoint: str
    env: dict[str, str]
    fs: object  # pyarrow GcsFileSystem on the emulator, for the test's own puts and gets

    def put(self, key: str, data: bytes) -> str:
        with self.fs.open_output_stream(f"{BUCKET}/{key}") as f:
            f.write(data)
        return f"{ROOT}/{key}"

    def get(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read()

    def keys(self, prefix: str) -> list[str]:
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(i.path[len(BUCKET) + 1 :] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    from pyarrow import fs as pafs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = start_server(
        [
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            BUCKET,
        ],
        f"{endpoint}/storage/v1/b/{BUCKET}",
        tmp_path_factory.mktemp("gcs") / "emulator.log",
    )
    env = {"CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint}
    patch = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            patch.setenv(key, value)
        fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{port}", scheme="http")
        yield GCS(endpoint, env, fs)
    finally:
        patch.undo()
        stop_server(server)


def test_anonymous_gs_uris_are_usable_while_userinfo_and_queries_are_refused():
    assert storage.check_uri(f"{ROOT}/x.csv") == f"{ROOT}/x.csv"
    assert storage.redact(f"{ROOT}/x.csv") == f"{ROOT}/x.csv"
    assert storage.uri_prefix(f"{ROOT}/x.csv") == "gs://anonymous@"
    assert storage.uri_prefix("S3://b/x") == "s3://"
    assert storage.redact(f"gs://anonymous:hunter2-secret@{BUCKET}/x") == f"gs://***@{BUCKET}/x"
    with pytest.raises(ConfigError, match="carries credentials"):
        load_config("demo", [f"data.train_path=gs://svc:hunter2-secret@{BUCKET}/x.csv"])
    # Options in a query would be dropped from every derived path (`<run dir>/adapter`): refused.
    with pytest.raises(ConfigError, match="starts a URI query.*CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        load_config("demo", [f"run.storage_path={ROOT}/runs?endpoint_override=127.0.0.1:9"])
    with pytest.raises(DataError, match=r"part-\?\.csv: a '\?' starts a URI query"):
        expand_paths(f"{ROOT}/data/part-?.csv")


def test_data_globs_validation_and_quarantine_on_gcs(gcs):
    check_globs_and_quarantine(gcs, ROOT)
    with storage.local_folder(f"{ROOT}/data") as local:
        assert sorted(os.listdir(local)) == ["part-1.csv", "part-2.csv"]


@pytest.mark.slow
def test_train_then_label_end_to_end_on_gcs(gcs, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gcs.put("in/train.csv", to_csv(demo_rows(120)))
    cfg_path = write_tiny_config(tmp_path / "tiny-gcs.yaml", tiny_model_dir, f"{ROOT}/in/train.csv", f"{ROOT}/runs", "tiny-gcs")
    env = {**os.environ, **gcs.env, "SENTIMENT_RAY_GIT_COMMIT": "test"}
    env.pop("RAY_ADDRESS", None)

    train = run_job(["jobs/train.py", "--config", str(cfg_path)], env)
    assert train.returncode == 0, train.stderr[-4000:]
    summary = last_json_line(train.stdout)
    run_dir = f"{ROOT}/runs/tiny-gcs"
    assert summary["run_dir"] == run_dir
    assert summary["adapter"] == f"{run_dir}/adapter"
    assert summary["steps"] == 2
    run_keys = gcs.keys("runs/tiny-gcs/")
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.json",
        "manifest.json",
        "validation_predictions.parquet",
    ):
        assert f"runs/tiny-gcs/{name}" in run_keys, run_keys
    assert any("/checkpoint-" in k for k in run_keys), "Ray Train's checkpoint is in GCS"

    unlabelled = demo_rows(40, start=500)
    gcs.put("unlabelled/part-0.csv", to_csv(unlabelled))
    label = run_job(
        [
            "jobs/label.py",
            "--config",
            str(cfg_path),
            "--input",
            f"{ROOT}/unlabelled/",
            "--adapter",
            f"{run_dir}/adapter",
            "--output",
            f"{ROOT}/labels",
            "--rows-per-unit",
            "20",
            "label.write_submission=true",
        ],
        env,
    )
    assert label.returncode == 0, label.stderr[-4000:]
    label_summary = last_json_line(label.stdout)
    assert label_summary["rows"] == label_summary["labelled"] == 40
    ids = []
    for key in (k for k in gcs.keys("labels/predictions/") if k.endswith(".parquet")):
        ids.extend(pq.read_table(pa.BufferReader(gcs.get(key))).column("ID").to_pylist())
    assert sorted(ids) == sorted(r["ID"] for r in unlabelled)  # every input ID exactly once
    submission = gcs.get("labels/submission.csv").decode().splitlines()
    assert submission[0] == "ID,label"
    assert [line.split(",")[0] for line in submission[1:]] == [r["ID"] for r in unlabelled]
