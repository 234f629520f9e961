"""An adapter records the base it was trained on; labelling with it on another base is
refused before Ray starts, in one line naming both (`model.allow_base_mismatch=true`
overrides another seed of the same shape, never another shape)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_model import build_tiny_model

from sentiment_ray import base_identity

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The base an adapter was trained on, another seed of it, and a base of another shape."""
    root = tmp_path_factory.mktemp("bases")
    trained = build_tiny_model(root / "trained", seed=0)
    other_seed = build_tiny_model(root / "other-seed", seed=1)
    narrow = root / "narrow"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
config = json.load(open({str(trained / "config.json")!r}))
config.update(hidden_size=32, intermediate_size=64)
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(**config)).save_pretrained({str(narrow)!r})
""",
        ],
        check=True,
        cwd=REPO_ROOT,
    )
    for name in os.listdir(trained):
        if "token" in name:
            (narrow / name).write_bytes((trained / name).read_bytes())
    adapter = root / "adapter"
    adapter.mkdir()
    # What training writes next to the adapter; the adapter's weights are not read before the check.
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(trained), "r": 4})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (adapter / base_identity.BASE_FILE).write_text(json.dumps(base_identity.identify(str(trained))))
    return {"trained": str(trained), "other_seed": str(other_seed), "narrow": str(narrow), "adapter": str(adapter)}


def label(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SENTIMENT_RAY_LOG")}
    return subprocess.run(
        [sys.executable, "jobs/label.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_same_base_passes_the_check(bases):
    base_identity.check(bases["adapter"], bases["trained"])


@pytest.mark.parametrize(
    "base, cause",
    [
        ("other_seed", "set model.name to the adapter's base, or model.allow_base_mismatch=true to apply it anyway"),
        ("narrow", "another shape (hidden_size 64 vs 32, intermediate_size 128 vs 64); set model.name to the adapter's base"),
    ],
)
def test_labelling_on_another_base_is_one_line_naming_both_before_ray_starts(bases, base, cause, tmp_path):
    (tmp_path / "in.csv").write_text("ID,sentence\n1,good\n", encoding="utf-8")
    out = label(
        [
            "--input",
            str(tmp_path / "in.csv"),
            "--output",
            str(tmp_path / "out"),
            "--adapter",
            bases["adapter"],
            f"model.name={bases[base]}",
            "model.dtype=float32",
        ]
    )
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"error: --adapter {bases['adapter']} was trained on {bases['trained']} (LlamaForCausalLM, ")
    assert f"model.name {bases[base]} (LlamaForCausalLM, " in lines[0]
    assert lines[0].endswith(cause)
    assert not (tmp_path / "out").exists()


def test_allow_base_mismatch_overrides_another_seed_but_not_another_shape(bases):
    base_identity.check(bases["adapter"], bases["other_seed"], allow_mismatch=True)
    with pytest.raises(base_identity.BaseMismatch, match="another shape"):
        base_identity.check(bases["adapter"], bases["narrow"], allow_mismatch=True)
