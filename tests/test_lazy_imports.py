"""Pure modules must not pull torch, transformers, unsloth or ray in at import time: the Ray
job driver and Tune trial drivers import them, and `import unsloth` raises without a GPU."""

import subprocess
import sys

import pytest

PURE = [
    "sentiment_ray",
    "sentiment_ray.config",
    "sentiment_ray.prompts",
    "sentiment_ray.labels",
    "sentiment_ray.metrics",
    "sentiment_ray.data",
    "sentiment_ray.label_units",
    "sentiment_ray.label_rows",
    "sentiment_ray.job_args",
    "sentiment_ray.search_space",
]
HEAVY = ["torch", "transformers", "unsloth", "ray", "peft", "trl"]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_nothing_heavy(module):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not present")
    code = (
        "import sys, importlib; importlib.import_module(%r); "
        "print(','.join(m for m in %r if m in sys.modules))" % (module, HEAVY)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"
