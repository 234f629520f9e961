"""Provenance: what produced a run (config, package versions, data fingerprint, backend,
device, code version), for a training run's manifest.json and a labelling run's manifest.

Pure: the standard library only (versions come from package metadata, not imports).
Credentials never reach a manifest: every string is masked (io.uris.redact_obj).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from sentiment_ray.io.uris import redact_obj

# The packages whose versions decide what a run computes.
TRACKED_PACKAGES = (
    "sentiment-ray",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "ray",
    "pyarrow",
    "unsloth",
    "unsloth-zoo",
    "bitsandbytes",
)

# `ray job submit --working-dir` uploads no .git; the submitter can pass the commit instead.
GIT_COMMIT_ENV = "SENTIMENT_RAY_GIT_COMMIT"
REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package; None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo_dir: Path = REPO_ROOT) -> str | None:
    """HEAD of the checkout ("<sha>-dirty" with uncommitted changes to tracked files), the
    SENTIMENT_RAY_GIT_COMMIT env var when set, or None when neither is available."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    if not (repo_dir / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def build_manifest(
    config: dict[str, Any],
    *,
    data_fingerprint: Any,
    backend: str,
    device: str,
    code_version: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict. `config` is the validated config as a plain dict (`model_dump()`).
    Credentials are masked in every string (storage.redact_obj)."""
    manifest = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "data_fingerprint": data_fingerprint,
        "backend": backend,
        "device": device,
        "git_commit": code_version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
    }
    manifest.update(extra or {})
    return redact_obj(manifest)
