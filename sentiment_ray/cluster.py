"""Getting a Ray cluster: connect to one that exists or start a local one; GPU detection; the
environment every Ray worker of this project runs with.

Light at import time: `ray` is imported inside the functions (job drivers import this module
before they know whether Ray is needed).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sentiment_ray import compat
from sentiment_ray.errors import UserError
from sentiment_ray.terminal import faults

REPO_ROOT = Path(__file__).resolve().parent.parent

# Settings that switch NVLink multicast (NVLS) off in NCCL, torch symmetric memory and
# NVSHMEM. It hangs or fails on some multi-GPU hosts; where it does, set these in the
# environment (a local cluster's workers inherit it) or in cluster/runtime_env.yaml. Run
# manifests record their values.
NVLINK_MULTICAST_VARS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")

# What `ray job submit --working-dir .` must not upload (Ray also honours .gitignore). The
# same list is in cluster/runtime_env.yaml; tests/unit/test_cluster_files.py keeps them equal.
WORKING_DIR_EXCLUDES = [
    ".venv/",
    "venv/",
    "runs/",
    ".git/",
    "*.whl",
    ".cache/",
    "__pycache__/",
    ".pytest_cache/",
    "*.egg-info/",
    "unsloth_compiled_cache/",
]


# Inside `ray job submit` the working dir is a temporary copy: relative output paths are
# taken under this folder of the driver's machine instead (SENTIMENT_RAY_HOME overrides it).
JOB_HOME_ENV = "SENTIMENT_RAY_HOME"
JOB_HOME_DEFAULT = "~/sentiment-ray"
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class ClusterError(UserError, RuntimeError):
    """The Ray address is unusable or the cluster cannot provide what the config asks."""


def in_ray_job() -> bool:
    """This process is the entrypoint of a `ray job submit` (Ray sets this variable)."""
    return _RAY_JOB_ENV in os.environ


def job_home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(JOB_HOME_ENV) or JOB_HOME_DEFAULT))


def durable_path(path: str) -> str:
    """Where an output path given relative lands. Inside a Ray job, under `job_home()`
    (`runs` -> `~/sentiment-ray/runs`), because the job's working dir is a temporary copy
    that Ray deletes; elsewhere the path as given. URIs and absolute paths are unchanged."""
    if not path or "://" in path or os.path.isabs(os.path.expanduser(path)) or not in_ray_job():
        return path
    return os.path.join(job_home(), path)


def durable_input_path(path: str | None) -> str | None:
    """An earlier job's output named relative (`--adapter runs/demo/adapter`): inside a Ray
    job, the copy under `job_home()` when the working dir has none."""
    if not path or "://" in path or os.path.exists(path) or not in_ray_job():
        return path
    candidate = durable_path(path)
    return candidate if os.path.exists(candidate) else path


def joins_existing_cluster(address: str = "") -> bool:
    """Whether `connect(address)` joins a cluster (an address, RAY_ADDRESS, a Ray job)
    rather than starting a private local one."""
    return in_ray_job() or bool(resolve_address(address))


def job_runtime_env(working_dir: str = ".") -> dict:
    """The runtime environment for `ray job submit` / a KubeRay RayJob (what
    cluster/runtime_env.yaml holds): the working dir without caches and venvs."""
    return {"working_dir": working_dir, "excludes": list(WORKING_DIR_EXCLUDES)}


def resolve_address(address: str = "") -> str:
    """The address to connect to: the argument (`run.ray_address`), else RAY_ADDRESS, else
    "" (start a local cluster). `auto` means the cluster `ray start` left on this machine."""
    target = (address or os.environ.get("RAY_ADDRESS", "")).strip()
    if target.startswith(("http://", "https://")):
        # The dashboard / jobs API address: what `ray job submit` wants, not `ray.init`.
        raise ClusterError(
            f"Ray address {target!r} is a dashboard (jobs API) URL; ray.init needs the cluster "
            "address (host:6379, 'auto', or ray://host:10001). To run on that cluster, submit "
            "the job instead: ray job submit --working-dir . -- python jobs/train.py ..."
        )
    return target


_after_connect: list[Callable[[], None]] = []


def after_connect(callback: Callable[[], None] | None) -> None:
    """Call `callback` once `connect` has initialised Ray (a job's log takes over the
    workers' output then); None forgets the callbacks."""
    if callback is None:
        _after_connect.clear()
    else:
        _after_connect.append(callback)


def connect(address: str = "", *, num_cpus: int | None = None) -> None:
    """Connect this process to Ray, once.

    With an address (argument, `run.ray_address`, or RAY_ADDRESS, which `ray job submit`
    sets for the entrypoint) it joins that cluster; otherwise it starts a private local
    cluster (never silently joining another `ray start` cluster on a shared machine: pass
    `auto` for that). Joining, token authentication needs nothing here: Ray reads the token
    from RAY_AUTH_TOKEN / ~/.ray/auth_token.

    A local cluster listens on the loopback interface only (`start_local`): nothing of it
    is reachable from other machines.
    """
    import ray
    from ray.job_config import JobConfig

    if ray.is_initialized():
        return
    target = resolve_address(address)
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if in_ray_job():
        # Inside `ray job submit`: workers import the package from the uploaded working dir.
        ray.init(address=target or "auto", **common)
    elif target:
        # A driver run from a checkout: workers on this node import the package from it.
        ray.init(address=target, job_config=JobConfig(code_search_path=[str(REPO_ROOT)]), **common)
    else:
        start_local(num_cpus=num_cpus, job_config=JobConfig(code_search_path=[str(REPO_ROOT)]), **common)
    faults.keep_signal_handlers()  # ray.init replaced the SIGTERM handler
    for callback in list(_after_connect):
        callback()


# A local cluster's settings: every server on 127.0.0.1, token authentication on.
LOCAL_HOST = "127.0.0.1"


def start_local(num_cpus: int | None = None, **init_kwargs) -> None:
    """Start a private single-node cluster bound to 127.0.0.1, with token authentication,
    in a temp folder of its own.

    Ray binds its gRPC servers (GCS, raylet, object manager, every worker), the dashboard
    agent and the metrics endpoints to all interfaces unless the node's address is the
    loopback address, and it resolves "127.0.0.1" given as the node address to the host's
    network address on Linux; what makes it keep 127.0.0.1 is the setting Ray uses for its
    single-machine mode (compat.ray_single_machine_node_ip). The dashboard is bound to
    127.0.0.1 too. Token authentication: Ray 2.60 turns it on for a new local cluster
    (creating ~/.ray/auth_token if missing) unless RAY_AUTH_MODE says otherwise; an explicit
    RAY_AUTH_MODE=disabled is respected, with a warning.

    Private, also from this host: Ray's processes that are given no address (the state API
    that Ray Train's placement-group cleaner asks whether the controller lives, among
    others) find "the" cluster through a discovery file in the host's Ray temp folder
    (/tmp/ray/ray_current_cluster), which any `ray start --head` on the machine rewrites, or
    by listing every GCS process on the host. Pointed at someone else's cluster, the
    cleaner finds no controller there and removes this run's placement group; finding
    several, it stops watching. So the cluster gets a temp folder of its own (its session,
    logs and sockets), RAY_TMPDIR names it for the driver and every process Ray starts (they
    inherit the driver's environment), and its discovery file names this cluster's GCS
    (`private_temp_root`). The folder is removed when the process exits.
    """
    import ray

    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        logging.getLogger(__name__).warning("RAY_AUTH_MODE=%s: the local Ray cluster starts without token authentication", mode)
    compat.ray_single_machine_node_ip()
    root = private_temp_root()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address=LOCAL_HOST,
        dashboard_host=LOCAL_HOST,
        _temp_dir=os.path.join(root, "ray"),
        **init_kwargs,
    )
    compat.write_ray_discovery_file(os.path.join(root, "ray"), ray.get_runtime_context().gcs_address)


# The private temp folders this process made for its local clusters (removed at exit).
_private_roots: list[str] = []


def private_temp_root() -> str:
    """A new folder (mode 0700) for a local cluster's files, named by RAY_TMPDIR from now on
    in this process and inherited by every process the cluster starts: Ray's default temp
    folder becomes `<it>/ray`, so nothing of the cluster reads the host's /tmp/ray. Short
    (`sray-` + 8 characters): Ray puts unix sockets below it, whose paths may not exceed 107
    bytes. Folders of clusters this process started earlier and has stopped are removed."""
    import ray

    if not ray.is_initialized():
        for old in _private_roots:
            shutil.rmtree(old, ignore_errors=True)
        _private_roots.clear()
    root = tempfile.mkdtemp(prefix="sray-")
    if not _private_roots:
        atexit.unregister(_remove_private_roots)  # once, however many clusters
        atexit.register(_remove_private_roots)
    _private_roots.append(root)
    os.environ["RAY_TMPDIR"] = root
    return root


def _remove_private_roots() -> None:
    """At exit: stop the local cluster (Ray's own exit handler would, later), then remove
    its folder."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - exiting: the folder is what matters here
        pass
    for root in _private_roots:
        shutil.rmtree(root, ignore_errors=True)
    _private_roots.clear()


def cluster_gpu_count() -> int:
    """GPUs the connected cluster has now (autoscaling clusters may add more later)."""
    import ray

    if not ray.is_initialized():
        raise ClusterError("cluster_gpu_count() needs a Ray connection: call connect() first")
    return int(ray.cluster_resources().get("GPU", 0))


def alive_node_count() -> int:
    """Nodes of the connected cluster that are alive now."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def resolve_use_gpu(setting: str) -> bool:
    """`run.use_gpu`: "true"/"false" as given; "auto" = the cluster has a GPU now."""
    if setting == "true":
        return True
    if setting == "false":
        return False
    if setting == "auto":
        return cluster_gpu_count() > 0
    raise ClusterError(f"run.use_gpu must be auto, true or false, got {setting!r}")
