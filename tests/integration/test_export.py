"""Export (sentiment_ray/export/, `sentiment-ray export`): an adapter merged into the
tiny random Llama on CPU (hf backend, peft merge_and_unload) gives a plain HF folder that
transformers loads without peft and that scores like base + adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_scoring import SENTENCES  # the same multilingual sentences

from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA adapter on the tiny model with random (non-zero) B matrices, so the merged
    weights differ from the base."""
    from tiny_model import build_tiny_adapter

    out = tmp_path_factory.mktemp("adapter")
    return build_tiny_adapter(tiny_model_dir, out, ["q_proj", "v_proj", "down_proj"], seed=0, b_std=0.5)


def _score(model, tokenizer, cfg):
    from sentiment_ray.scoring import LabelScorer

    scorer = LabelScorer(model, tokenizer, PromptTemplate.from_config(cfg.prompt), LabelSet(cfg.prompt.labels), 128, 4)
    return scorer.score(SENTENCES)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dir):
    """(base + adapter scores, base-only scores) through the hf backend on CPU."""
    from sentiment_ray.backends.hf import HFBackend
    from sentiment_ray.config import ExperimentConfig

    cfg = ExperimentConfig(model={"name": tiny_model_dir, "backend": "hf", "load_in_4bit": False, "dtype": "float32"})
    with_adapter = _score(*HFBackend().load_for_inference(cfg, adapter_dir, "cpu"), cfg)
    base = _score(*HFBackend().load_for_inference(cfg, None, "cpu"), cfg)
    return cfg, with_adapter, base


def _load_plain(folder: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_export_float32_scores_like_base_plus_adapter(reference, adapter_dir, tmp_path):
    from sentiment_ray.cli import main

    cfg, with_adapter, base = reference
    # The adapter matters: without it the probabilities differ.
    assert np.abs(with_adapter.probs - base.probs).max() > 0.01
    out = tmp_path / "merged"
    config_path = tmp_path / "cfg.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # What training saves with an adapter: its data profile and its calibration scores.
    from sentiment_ray import languages, risk

    profile = languages.data_profile(
        ["en"] * 8, ["Positive", "Negative"] * 4, ["en"] * 4, ["Positive", "Negative"] * 2, detected=False
    )
    (Path(adapter_dir) / languages.PROFILE_FILE).write_text(json.dumps(profile))
    rng = np.random.default_rng(0)
    scores = risk.scores_record(rng.uniform(0.9, 1, 500), rng.uniform(size=500) < 0.99, temperature=1.0)
    (Path(adapter_dir) / risk.RISK_FILE).write_text(json.dumps(scores))
    assert (
        main(
            [
                "export",
                "--config",
                str(config_path),
                "--adapter",
                adapter_dir,
                "--output",
                str(out),
                "--dtype",
                "float32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "sentiment_ray_export.json"} <= files
    assert not any(name.startswith("adapter_") for name in files)  # a plain model, no peft files
    info = json.loads((out / "sentiment_ray_export.json").read_text())
    assert info["backend"] == "hf"
    assert info["dtype"] == "float32"
    assert info["prompt"]["labels"] == ["Positive", "Negative"]
    # The metadata says what the adapter knows and which thresholds its calibration rows certify.
    assert info["data_profile"] == profile
    assert info["risk_control"] == json.loads(json.dumps(risk.summary(scores)))
    assert info["risk_control"]["delta"] == 0.05
    assert info["risk_control"]["certified"][2]["threshold"] is not None

    model, tokenizer = _load_plain(str(out))
    assert type(model).__module__.startswith("transformers.")  # not a peft model
    merged = _score(model, tokenizer, cfg)
    assert merged.predicted() == with_adapter.predicted()
    np.testing.assert_allclose(merged.probs, with_adapter.probs, atol=1e-4)


def test_export_bfloat16_by_default_within_tolerance(reference, adapter_dir, tmp_path):
    import torch

    from sentiment_ray.export.recipe import export_merged

    cfg, with_adapter, _ = reference
    summary = export_merged(cfg, adapter_dir, str(tmp_path / "bf16"), device="cpu")
    assert summary["dtype"] == "bfloat16"
    assert summary["backend"] == "hf"
    # Every exported file is as readable as the others (the weights are not left private).
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: (tmp_path / "bf16" / name).stat().st_mode & 0o777 for name in os.listdir(tmp_path / "bf16")}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    merged = _score(*_load_plain(str(tmp_path / "bf16")), cfg)
    np.testing.assert_allclose(merged.probs, with_adapter.probs, atol=0.03)
    clear = np.abs(with_adapter.probs[:, 0] - 0.5) > 0.03  # labels agree wherever rounding cannot flip them
    assert clear.any()
    assert [p for p, c in zip(merged.predicted(), clear) if c] == [p for p, c in zip(with_adapter.predicted(), clear) if c]


def test_export_refuses_a_non_empty_output_and_a_non_adapter(reference, adapter_dir, tmp_path, tiny_model_dir):
    from sentiment_ray.export.recipe import ExportError, export_merged

    cfg = reference[0]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_merged(cfg, adapter_dir, str(tmp_path / "full"), device="cpu")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    with pytest.raises(ExportError, match="adapter_config.json"):
        export_merged(cfg, tiny_model_dir, str(tmp_path / "out"), device="cpu")
