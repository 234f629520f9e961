"""MLflow tracking (sentiment_ray/tracking.py): where runs go, and what a training run and a
tune experiment on the tiny model log, read back through mlflow.MlflowClient."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sentiment_ray import tracking

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")


# ============================================================================ settings


def test_store_resolution(tiny_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = str(tmp_path / "runs" / "x")
    uri, artifacts = tracking.resolve_store(tiny_cfg, run_dir)
    assert uri == f"sqlite:///{run_dir}/mlflow/mlflow.db"
    assert artifacts == Path(run_dir, "mlflow", "artifacts").as_uri()
    assert os.path.isdir(os.path.join(run_dir, "mlflow"))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.resolve_store(tiny_cfg, run_dir) == ("http://mlflow.internal:5000", None)
    assert tracking.for_workers(tiny_cfg).tracking.mlflow_tracking_uri == "http://mlflow.internal:5000"
    tiny_cfg.tracking.mlflow_tracking_uri = "sqlite:////tmp/elsewhere.db"  # the config wins
    assert tracking.resolve_store(tiny_cfg, run_dir)[0] == "sqlite:////tmp/elsewhere.db"
    assert tracking.for_workers(tiny_cfg).tracking.mlflow_tracking_uri == "sqlite:////tmp/elsewhere.db"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tiny_cfg.tracking.mlflow_tracking_uri = ""
    monkeypatch.setattr(tracking, "FALLBACK_DIR", tmp_path / "fallback")
    with caplog.at_level("WARNING"):
        uri, _ = tracking.resolve_store(tiny_cfg, "s3://bucket/runs/x")
    assert uri == f"sqlite:///{tmp_path}/fallback/mlflow.db"
    assert "not local" in caplog.text


def test_enabled_modes_and_params(tiny_cfg, monkeypatch):
    assert tracking.enabled(tiny_cfg)  # auto + mlflow installed
    tiny_cfg.tracking.mlflow = "false"
    assert not tracking.enabled(tiny_cfg)
    tiny_cfg.tracking.mlflow = "true"
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tracking.TrackingError, match=r"sentiment-ray\[mlflow\]"):
        tracking.enabled(tiny_cfg)
    tiny_cfg.tracking.mlflow = "auto"
    assert not tracking.enabled(tiny_cfg)

    params = tracking.flatten(tiny_cfg.model_dump(mode="json"))
    assert params["train.learning_rate"] == str(tiny_cfg.train.learning_rate)
    assert params["lora.r"] == "4"
    assert params["prompt.labels"] == '["Positive", "Negative"]'
    assert params["run.name"] == "tiny"


def test_tracking_errors_never_stop_training(tiny_cfg, tmp_path, caplog):
    tiny_cfg.tracking.mlflow_tracking_uri = "unknown-scheme://nowhere"
    with caplog.at_level("WARNING"):
        assert tracking.start_training(tiny_cfg, str(tmp_path / "run")) is None
    assert "MLflow tracking is off" in caplog.text


def test_step_metrics_reach_mlflow_in_batches_at_checkpoints_evaluations_and_the_end():
    """A training step does not wait for an MLflow write: step entries are written together
    at a checkpoint, an evaluation, the end of training, or once the flush interval passed,
    and every one of them arrives with its step."""
    from types import SimpleNamespace

    writes = []
    tracker = SimpleNamespace(log_metric_history=lambda entries: writes.append([(m, step) for m, step, _ in entries]))
    reporter = SimpleNamespace(last_eval_step=-1, last_eval=None)
    (callback,) = tracking.training_callbacks(tracker, reporter, flush_every_s=3600)

    def step(n, *, save=False):
        state = SimpleNamespace(global_step=n, is_world_process_zero=True)
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 1.0 / n})
        if save:
            callback.on_save(None, state, None)
        return state

    step(1), step(2)
    assert writes == []  # no write per step
    step(3, save=True)
    assert writes == [[({"loss": 1.0}, 1), ({"loss": 0.5}, 2), ({"loss": 1 / 3}, 3)]]
    reporter.last_eval_step, reporter.last_eval = 4, {"accuracy": 0.5, "macro_f1": 0.4, "ece": 0.1, "n": 8}
    step(4)
    assert writes[1][0][1] == 4
    assert writes[1][0][0]["val_accuracy"] == 0.5  # an evaluation is written at once
    state = step(5)
    callback.on_train_end(None, state, None)
    assert [entries for entries in writes[2:]] == [[({"loss": 0.25}, 4), ({"loss": 0.2}, 5)]]

    (callback,) = tracking.training_callbacks(tracker, reporter, flush_every_s=0)
    writes.clear()
    step(6)
    assert writes == [[({"loss": 1 / 6}, 6)]]  # the interval passed: written


# ============================================================================ runs on Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from sentiment_ray import cluster as ray_cluster

    ray_cluster.connect(num_cpus=2)
    yield
    ray.shutdown()


def _client(store_folder: Path):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{store_folder / 'mlflow' / 'mlflow.db'}")


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _assert_training_run(client, run, cfg, steps: int) -> None:
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["lora.r"] == str(cfg.lora.r)
    assert "train.learning_rate" in params
    assert params["train.max_steps"] == str(steps)
    assert params["model.backend"] == "hf"
    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, steps + 1))  # logging_steps=1
    val = client.get_metric_history(run_id, "val_macro_f1")
    assert {m.step for m in val} >= {cfg.train.eval_steps, steps}
    final = run.data.metrics
    for key in ("fine_tuned_accuracy", "fine_tuned_macro_f1", "fine_tuned_ece", "tokens_per_second"):
        assert key in final
    assert final["global_step"] == steps
    files = _artifact_paths(client, run_id)
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json", "manifest.json"} <= files


@pytest.mark.slow
def test_training_run_logs_params_step_metrics_final_metrics_and_adapter(ray_local, tiny_cfg, monkeypatch):
    import json

    from sentiment_ray.train.recipe import run_training

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg
    cfg.run.name = "tracked"
    cfg.train.max_steps, cfg.train.eval_steps, cfg.train.logging_steps = 4, 2, 1
    cfg.train.zero_shot_eval = True
    summary = run_training(cfg)
    run_dir = Path(summary["run_dir"])
    client = _client(run_dir)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    assert runs[0].info.run_name == "tracked"
    assert runs[0].data.tags[tracking.RUN_DIR_TAG] == str(run_dir)
    assert runs[0].data.tags[tracking.KIND_TAG] == "train"
    _assert_training_run(client, runs[0], cfg, 4)
    assert runs[0].data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert runs[0].data.metrics["fine_tuned_accuracy"] == pytest.approx(metrics["fine_tuned"]["accuracy"])
    assert runs[0].data.metrics["zero_shot_macro_f1"] == pytest.approx(metrics["zero_shot"]["macro_f1"])
    # The artifacts are the adapter files as written.
    local = client.download_artifacts(runs[0].info.run_id, "adapter/adapter_config.json", str(run_dir.parent / "dl"))
    assert Path(local).read_text() == (run_dir / "adapter" / "adapter_config.json").read_text()

    # `sentiment-ray eval` on the run folder reads validation_predictions.parquet: same metrics.
    from sentiment_ray.eval.recipe import evaluate_to_report

    evaluated = evaluate_to_report(predictions=str(run_dir))
    assert evaluated["report"] == str(run_dir / "eval-report.html")
    assert evaluated["n"] == metrics["fine_tuned"]["n"]
    assert evaluated["accuracy"] == pytest.approx(metrics["fine_tuned"]["accuracy"])
    assert evaluated["ece"] == pytest.approx(metrics["fine_tuned"]["ece"], abs=1e-6)


@pytest.mark.slow
def test_tune_logs_a_parent_run_with_one_nested_run_per_trial(ray_local, tiny_cfg, monkeypatch):
    from sentiment_ray.tune.recipe import run_tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.eval_steps, cfg.train.logging_steps = 2, 1, 1
    cfg.data.max_validation_rows = 16
    cfg.tune.num_samples, cfg.tune.scheduler, cfg.tune.max_concurrent_trials = 2, "fifo", 2
    cfg.tune.experiment_name = "tracked-tune"
    cfg.tune.search_space = {"train.learning_rate": {"type": "choice", "values": [1e-3, 1e-4]}}
    summary = run_tune(cfg)
    exp_path = Path(summary["experiment"])
    client = _client(exp_path)
    experiment = client.get_experiment_by_name("tracked-tune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "tune"]
    trials = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "tune_trial"]
    assert len(parents) == 1
    assert len(trials) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "tracked-tune"
    assert parent.data.metrics["trials"] == 2
    assert "best_val_macro_f1" in parent.data.metrics
    assert parent.data.tags["sentiment_ray.best_trial"] == summary["best_trial"]
    assert "train.learning_rate" in parent.data.params["tune.search_space"]
    assert {"trials.csv", "metric_vs_step.png"} <= _artifact_paths(client, parent.info.run_id)
    assert {r.info.run_name for r in trials} == {f"trial_{t}" for t in _trial_ids(exp_path)}
    for run in trials:
        assert run.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        _assert_training_run(client, run, cfg, 2)
    assert {r.data.params["train.learning_rate"] for r in trials} <= {"0.001", "0.0001"}


def _trial_ids(exp_path: Path) -> list[str]:
    return [p.name.removeprefix("trial_") for p in (exp_path / "train_runs").iterdir() if p.name.startswith("trial_")]
