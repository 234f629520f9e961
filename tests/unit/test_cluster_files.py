"""The cluster launcher YAML, the KubeRay RayJob and the runtime env: they parse, point at
files that exist, run a shipped preset, and agree with sentiment_ray.cluster."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from sentiment_ray import cluster as ray_cluster
from sentiment_ray.config import load_config, preset_names

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"


def _load(name: str) -> dict:
    data = yaml.safe_load((CLUSTER / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"cluster/{name} is not a YAML mapping"
    return data


def _train_command(entrypoint: str) -> tuple[str, str, list[str]]:
    """(script, --config value, overrides) of a `python jobs/train.py ...` command."""
    words = shlex.split(entrypoint)
    assert words[0] in {"python", "python3"}, entrypoint
    script, rest = words[1], words[2:]
    assert "--config" in rest, f"the entrypoint names no --config: {entrypoint}"
    i = rest.index("--config")
    return script, rest[i + 1], rest[:i] + rest[i + 2 :]


def test_runtime_env_matches_ray_cluster():
    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert env["excludes"] == ray_cluster.WORKING_DIR_EXCLUDES
    assert ray_cluster.job_runtime_env() == {k: v for k, v in env.items() if k != "env_vars"}
    # NVLink multicast is the user's choice: the file offers the settings, commented out.
    assert not env.get("env_vars")
    text = (REPO_ROOT / "cluster" / "runtime_env.yaml").read_text(encoding="utf-8")
    assert all(f"#   {name}:" in text for name in ray_cluster.NVLINK_MULTICAST_VARS)


def test_rayignore_matches_ray_cluster():
    """`ray job submit --working-dir .` without cluster/runtime_env.yaml excludes the same."""
    lines = (REPO_ROOT / ".rayignore").read_text(encoding="utf-8").splitlines()
    assert [x for x in lines if x and not x.startswith("#")] == ray_cluster.WORKING_DIR_EXCLUDES


def test_rayjob_runs_a_shipped_preset_with_gpu_workers():
    job = _load("rayjob-train.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    script, config_name, overrides = _train_command(job["spec"]["entrypoint"])
    assert (REPO_ROOT / script).is_file(), f"entrypoint runs {script}, which is not in the repo"
    assert config_name in preset_names()
    cfg = load_config(config_name, overrides)  # the overrides are valid for that preset
    assert cfg.run.storage_path.startswith("s3://"), "multi-node runs need shared storage"

    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    reference = _load("runtime_env.yaml")
    assert runtime_env.get("env_vars") == reference.get("env_vars")
    assert runtime_env["excludes"] == reference["excludes"]

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for group in cluster["workerGroupSpecs"]
        for c in group["template"]["spec"]["containers"]
    ]
    assert gpus
    assert all(int(n) >= 1 for n in gpus)


def test_dockerfile_copies_what_exists():
    for line in (CLUSTER / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"cluster/Dockerfile copies {source}, which is missing"


def test_cluster_launcher_has_a_gpu_worker_type_and_installs_the_gpu_extra():
    cluster = _load("gpu-cluster.yaml")
    assert cluster["provider"]["type"] in {"aws", "gcp"}
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    gpu_types = [name for name, spec in node_types.items() if spec.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "no worker node type declares a GPU"
    setup = " ".join(cluster["setup_commands"])
    assert "[gpu]" in setup
    assert "sentiment-ray" in setup
    # The synced folder is this checkout.
    assert "." in cluster["file_mounts"].values()
    # Every command starts Ray from the project's venv, where the packages are.
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        assert "venv/bin/activate" in command


def test_the_cluster_files_expose_nothing_and_say_what_to_open():
    """The VM cluster's dashboard is on the head's loopback (reached over SSH); the KubeRay
    head's is on the pod address only because its submitter needs it; both files say which
    ports to open, between whom and why."""
    launcher = _load("gpu-cluster.yaml")
    starts = " ".join(launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"])
    assert "0.0.0.0" not in starts
    assert "--dashboard-host=127.0.0.1" in starts
    for name in ("gpu-cluster.yaml", "rayjob-train.yaml"):
        text = (CLUSTER / name).read_text(encoding="utf-8")
        assert "# Network:" in text, name
        for port in ("8265", "6379", "52365", "10001", "RAY_AUTH_MODE=token"):
            assert port in text, (name, port)
    job = (CLUSTER / "rayjob-train.yaml").read_text(encoding="utf-8")
    assert "NetworkPolicy" in job
    assert "ClusterIP" in job
