"""Every use of a library's private internals, in one place, checked against the versions it
was written for.

The pinned libraries expose no public API for these; each accessor says what it reaches and
why. `check()` verifies every one on the installed versions; tests/unit/test_compat.py runs
it, so a version bump that moves one of these fails loudly there, not in a user's run.

Pure at import time: each library is imported inside the accessor that needs it.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

# The versions these accessors were written and tested against.
WRITTEN_FOR = {"transformers": "5.17.0", "trl": "1.15.0", "ray": "2.60.0"}


class CompatError(RuntimeError):
    """An installed library no longer has an internal this project relies on."""


# ----------------------------------------------------------------------------- transformers


def tokens_seen_before_this_attempt(trainer: Any) -> int:
    """The HF Trainer's token count restored from a checkpoint when training resumed
    (`Trainer._initial_num_input_tokens_seen`): subtracted from `state.num_input_tokens_seen`
    to get the tokens this attempt trained on, for a resumed run's tokens/s."""
    return int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)


# ----------------------------------------------------------------------------- trl


def trl_fused_loss_kernel() -> Any:
    """TRL's fused LM-head + loss kernel (`trl.trainer.utils._ChunkedLogProbFunction`), or
    None where TRL could not import it (no Triton: CPU builds of torch). SFTTrainer computes
    its loss with it; where it is None the project's trainer uses the model's own loss."""
    from trl.trainer import utils as trl_utils

    return getattr(trl_utils, "_ChunkedLogProbFunction", None)


# ----------------------------------------------------------------------------- ray tune


def asha_rungs(scheduler: Any) -> list[list[tuple[float, dict]]]:
    """ASHA's rungs per bracket (`AsyncHyperBandScheduler._brackets[i]._rungs`: a list of
    (milestone, {trial id: reward})). Tune restores a scheduler empty after a restart; the
    project saves these records and puts them back (tune/scheduler.py)."""
    return [bracket._rungs for bracket in scheduler._brackets]


# ----------------------------------------------------------------------------- ray core


def ray_single_machine_node_ip() -> None:
    """Make a local cluster this process starts use 127.0.0.1 as its node address.

    Ray resolves a loopback node address to the host's network address
    (`ray._private.services.resolve_ip_for_localhost`) unless
    `ray._private.ray_constants.ENABLE_RAY_CLUSTER` is false, the single-machine mode Ray
    uses on macOS and Windows (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once at
    import). With a loopback node address every Ray server binds 127.0.0.1 instead of all
    interfaces. Set on the imported module (and in the environment, for the processes Ray
    starts), so it holds whether or not ray was imported before."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def write_ray_discovery_file(ray_temp_dir: str, gcs_address: str) -> str:
    """Write the file through which Ray's processes given no address find their cluster
    (`ray._common.utils.get_ray_address_file(temp_dir)`: `<temp_dir>/ray_current_cluster`,
    read by `ray._private.services.get_ray_address_from_environment`, which the state API,
    `ray.init("auto")` and the CLI use; `ray start --head` writes it), naming `gcs_address`.
    Its path."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(ray_temp_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(gcs_address)
    return path


# ----------------------------------------------------------------------------- ray: worker output


_WORKER_OUTPUT_HANDLER = "sentiment_ray_worker_output"


def replace_worker_output_printer(handler: Any) -> Any:
    """Route the worker output Ray forwards to a driver through `handler(batch, ray_printer)`
    instead of Ray's printer. Ray (`ray._private.worker.connect`, log_to_driver=True)
    registers its printer as the handler "ray_print_logs" of
    `ray._private.ray_logging.global_worker_stdstream_dispatcher`; each batch is a dict with
    `lines`, `pid`, `ip`, `is_err`, `actor_name`, `task_name`. `ray_printer(batch)` prints a
    batch as Ray would (None when Ray had no printer). Returns a function that puts Ray's
    printer back."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    original = next((fn for name, fn in dispatcher.handlers if name == "ray_print_logs"), None)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(_WORKER_OUTPUT_HANDLER)
    dispatcher.add_handler(_WORKER_OUTPUT_HANDLER, lambda batch: handler(batch, original))

    def restore() -> None:
        dispatcher.remove_handler(_WORKER_OUTPUT_HANDLER)
        if original is not None and not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
            dispatcher.add_handler("ray_print_logs", original)

    return restore


# ----------------------------------------------------------------------------- ray train


# The file Ray Train keeps in a run folder listing the checkpoints it registered (the one a
# resumed run restores from); ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME.
RAY_TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def latest_registered_checkpoint(snapshot: dict) -> str | None:
    """The folder name of the checkpoint a rerun resumes from, from Ray Train's snapshot
    (`_CheckpointManagerState.latest_checkpoint_result.checkpoint_dir_name`): a checkpoint
    folder whose upload had not been registered when a run died is not in it. Read without
    importing ray (the driver reads it before deciding to start Ray)."""
    latest = snapshot.get("latest_checkpoint_result") if isinstance(snapshot, dict) else None
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    return name if isinstance(name, str) and name else None


# ----------------------------------------------------------------------------- check


def check() -> list[str]:
    """Problems with the installed versions (empty when every internal is where it should be)."""
    problems = []
    for name, version in WRITTEN_FOR.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if installed != version:
            problems.append(f"{name} {installed} is installed; sentiment_ray/compat.py was written for {version}: re-check it")
    try:
        import inspect

        from transformers import Trainer

        if "_initial_num_input_tokens_seen" not in inspect.getsource(Trainer):
            problems.append("transformers.Trainer no longer sets _initial_num_input_tokens_seen")
    except Exception as err:  # noqa: BLE001
        problems.append(f"transformers.Trainer: {err}")
    try:
        from trl.trainer import utils as trl_utils

        if not hasattr(trl_utils, "_ChunkedLogProbFunction"):  # None without Triton, but defined
            problems.append("trl.trainer.utils._ChunkedLogProbFunction is gone")
    except Exception as err:  # noqa: BLE001
        problems.append(f"trl: {err}")
    try:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        asha = AsyncHyperBandScheduler(time_attr="step", max_t=8, grace_period=1, metric="m", mode="max")
        rungs = asha_rungs(asha)
        if not rungs or not all(isinstance(m, (int, float)) and isinstance(r, dict) for b in rungs for m, r in b):
            problems.append(f"AsyncHyperBandScheduler rungs have another shape: {rungs!r}")
    except Exception as err:  # noqa: BLE001
        problems.append(f"ray.tune AsyncHyperBandScheduler._brackets/_rungs: {err}")
    try:
        import inspect

        from ray._private import ray_constants, services

        if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER") or not hasattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR"):
            problems.append("ray._private.ray_constants.ENABLE_RAY_CLUSTER(S_ENV_VAR) is gone")
        elif "ray_constants.ENABLE_RAY_CLUSTER" not in inspect.getsource(services.get_node_ip_address):
            problems.append("ray._private.services.get_node_ip_address no longer reads ray_constants.ENABLE_RAY_CLUSTER")
    except Exception as err:  # noqa: BLE001
        problems.append(f"ray._private.ray_constants: {err}")
    try:
        import inspect
        import tempfile

        from ray._common import utils as ray_common_utils
        from ray._private import services

        with tempfile.TemporaryDirectory() as folder:
            written = write_ray_discovery_file(folder, "127.0.0.1:1")
            if ray_common_utils.get_ray_address_file(None) != os.path.join(
                ray_common_utils.get_default_ray_temp_dir(), "ray_current_cluster"
            ):
                problems.append("Ray's discovery file is no longer <default temp dir>/ray_current_cluster")
            if services.find_bootstrap_address(folder) != "127.0.0.1:1" or not written.startswith(folder):
                problems.append("ray._private.services.find_bootstrap_address does not read the discovery file written")
        if "RAY_TMPDIR" not in inspect.getsource(ray_common_utils.get_default_system_temp_dir):
            problems.append("Ray's default temp folder no longer follows RAY_TMPDIR")
    except Exception as err:  # noqa: BLE001
        problems.append(f"ray discovery file: {err}")
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        if not all(hasattr(dispatcher, a) for a in ("handlers", "add_handler", "remove_handler")):
            problems.append("ray's global_worker_stdstream_dispatcher lost handlers/add_handler/remove_handler")
        import inspect

        from ray._private import worker as ray_worker

        if '"ray_print_logs"' not in inspect.getsource(ray_worker.connect):
            problems.append("ray._private.worker.connect no longer registers the printer 'ray_print_logs'")
    except Exception as err:  # noqa: BLE001
        problems.append(f"ray worker output dispatcher: {err}")
    try:
        from ray.train.v2._internal import constants as train_constants
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

        if train_constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME != RAY_TRAIN_SNAPSHOT_FILE:
            problems.append(f"Ray Train's snapshot file is now {train_constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}")
        if "latest_checkpoint_result" not in _CheckpointManagerState.model_fields:
            problems.append("Ray Train's checkpoint snapshot has no latest_checkpoint_result")
    except Exception as err:  # noqa: BLE001
        problems.append(f"ray.train checkpoint snapshot: {err}")
    return problems
