"""Fixtures shared by the integration tests that run the labelling job on a Ray cluster."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray cluster (2 CPUs) for the module; its address lets subprocess drivers join."""
    import ray

    from sentiment_ray.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    connect("", num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
