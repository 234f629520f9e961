"""One training run on two Ray Train workers (DDP over gloo, CPU) and labelling on a two-node
local Ray cluster: the data-parallel update equals one worker's with the same global batch,
its checkpoint resumes on one worker, and actors on both nodes label every ID exactly once
into object storage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from tiny_model import DEMO_CSV

from sentiment_ray.config import ExperimentConfig

pytestmark = pytest.mark.slow


def make_cfg(model_dir: str, storage: Path, name: str, workers: int, batch: int, **train) -> ExperimentConfig:
    return ExperimentConfig(
        model={"name": model_dir, "backend": "hf", "load_in_4bit": False, "dtype": "float32", "max_seq_length": 128},
        lora={"r": 4, "alpha": 8, "gradient_checkpointing": "false"},
        data={"train_path": str(DEMO_CSV), "validation_fraction": 0.1, "max_train_rows": 64, "max_validation_rows": 16},
        train={
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1,
            "max_steps": 2,
            "warmup_steps": 0,
            "optim": "adamw_torch",
            "packing": False,
            "eval_batch_size": 16,
            "zero_shot_eval": False,
            "seed": 0,
            "learning_rate": 1e-3,
            "save_steps": 1,
            "calibrate": False,
            **train,
        },
        run={
            "name": name,
            "storage_path": str(storage),
            "use_gpu": "false",
            "num_workers": workers,
            "cpus_per_worker": 1,
            "checkpoints_to_keep": 2,
        },
    )


@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    from sentiment_ray import cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster.connect("", num_cpus=2)
    yield
    ray.shutdown()


def _adapter(run_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def test_two_workers_give_the_update_of_one_with_the_same_global_batch(ray_two_cpus, tiny_model_dir, tmp_path):
    """2 workers x 4 rows == 1 worker x 8 rows: the same rows per optimizer step (each worker
    takes its part of the global batch), gradients averaged by DDP."""
    from sentiment_ray.train.recipe import run_training

    two = run_training(make_cfg(tiny_model_dir, tmp_path, "two-workers", workers=2, batch=4))
    one = run_training(make_cfg(tiny_model_dir, tmp_path, "one-worker", workers=1, batch=8))
    two_metrics = json.loads(Path(two["run_dir"], "metrics.json").read_text())
    assert two_metrics["world_size"] == 2
    a, b = _adapter(two["run_dir"]), _adapter(one["run_dir"])
    assert a.keys() == b.keys()
    for name in a:
        moved = float((b[name] - (0 if "lora_B" in name else b[name])).abs().max())
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=1e-3, atol=1e-4 * max(moved, 1e-3), err_msg=name)


def test_a_two_worker_checkpoint_resumes_on_one_worker(ray_two_cpus, tiny_model_dir, tmp_path, monkeypatch):
    import ray.train

    from sentiment_ray.train.recipe import run_training
    from sentiment_ray.train.trainer import FAIL_AT_STEP_ENV

    cfg = make_cfg(tiny_model_dir, tmp_path, "resume-on-one", workers=2, batch=4, max_steps=3)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "2")
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(cfg)
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    cfg.run.num_workers, cfg.train.per_device_train_batch_size = 1, 8  # the same global batch
    summary = run_training(cfg)
    train = json.loads(Path(summary["run_dir"], "metrics.json").read_text())["train"]
    assert train["resumed_from_step"] >= 1
    assert train["global_step"] == 3


@pytest.fixture
def s3_bucket(tmp_path, monkeypatch):
    """A moto S3 server on loopback and the AWS variables pointing at it (set before the
    cluster starts, so its nodes inherit them)."""
    import boto3
    from object_store import free_port, start_server, stop_server

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    server = start_server(
        ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], f"{endpoint}/moto-api/", tmp_path / "moto.log"
    )
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="two-nodes")
    try:
        yield client
    finally:
        stop_server(server)


def test_two_nodes_label_every_id_once_into_object_storage(tiny_model_dir, tmp_path, s3_bucket):
    """Actors on both nodes of a local two-node cluster write their units to a loopback S3
    server; a node-local output path is refused before anything runs."""
    import ray
    from object_store import demo_rows
    from ray.cluster_utils import Cluster

    from sentiment_ray.label.plan import LabelRunError
    from sentiment_ray.label.recipe import label_dataset

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rows = demo_rows(60)
        for i, part in enumerate((rows[:30], rows[30:])):
            pacsv.write_csv(pa.Table.from_pylist(part), tmp_path / f"part-{i}.csv")
        cfg = ExperimentConfig(
            model={"name": tiny_model_dir, "backend": "hf", "load_in_4bit": False, "dtype": "float32", "max_seq_length": 96},
            run={"use_gpu": "false", "ray_address": cluster.address},
            label={"num_actors": 2, "rows_per_unit": 10, "write_submission": True},
        )
        with pytest.raises(LabelRunError, match="is a local path but the Ray cluster has 2 nodes"):
            label_dataset(cfg, str(tmp_path / "part-*.csv"), str(tmp_path / "local-out"))
        assert not (tmp_path / "local-out" / "_manifest.json").exists()

        summary = label_dataset(cfg, str(tmp_path / "part-*.csv"), "s3://two-nodes/labels")
        assert summary["rows"] == summary["labelled"] == 60
        assert summary["units"]["total"] == 6
        listed = s3_bucket.list_objects_v2(Bucket="two-nodes", Prefix="labels/_done/")["Contents"]
        keys = [o["Key"] for o in listed if o["Key"].endswith(".json")]  # not the folder's own marker object
        markers = [json.loads(s3_bucket.get_object(Bucket="two-nodes", Key=k)["Body"].read()) for k in keys]
        assert len({m["node_id"] for m in markers}) == 2  # actors on both nodes labelled units
        submission = s3_bucket.get_object(Bucket="two-nodes", Key="labels/submission.csv")["Body"].read().decode()
        ids = [line.split(",")[0] for line in submission.splitlines()[1:]]
        assert ids == [r["ID"] for r in rows]  # every ID once, in input order
    finally:
        ray.shutdown()
        cluster.shutdown()
