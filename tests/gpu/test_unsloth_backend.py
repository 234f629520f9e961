"""GPU only: the unsloth backend (and the hf backend's 4-bit path) on the tiny model and the
real demo model. Skips cleanly without CUDA (conftest's `gpu` marker hook).

Unsloth must be imported before transformers in its process, and the pytest process has
already imported transformers (to build the tiny model), so the Unsloth checks run in a
fresh interpreter that calls `early_import("unsloth")` first, as a Ray worker does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_models]

REPO_ROOT = Path(__file__).resolve().parents[2]

UNSLOTH_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from sentiment_ray.backends import early_import
    early_import("unsloth")                       # before transformers/peft/trl

    import numpy as np
    import torch
    from sentiment_ray.backends import get_backend
    from sentiment_ray.config import ExperimentConfig
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.prompts import PromptTemplate
    from sentiment_ray.scoring import LabelScorer

    model_dir, adapter_dir = sys.argv[1], sys.argv[2]
    cfg = ExperimentConfig(
        model={"name": model_dir, "backend": "unsloth", "load_in_4bit": True, "max_seq_length": 256},
        lora={"r": 8, "alpha": 16},
    )
    sentences = ["I love this phone", "terrible service, never again", "meh",
                 "El servicio fue excelente y la comida deliciosa, volveremos pronto"]
    template, labels = PromptTemplate.from_config(cfg.prompt), LabelSet(cfg.prompt.labels)

    def probs(model, tok, batch_size=4, reuse_prefix=True):
        scorer = LabelScorer(model, tok, template, labels, 256, batch_size, reuse_prefix=reuse_prefix)
        return scorer.score(sentences).probs

    backend = get_backend("unsloth")
    model, tok = backend.load_for_training(cfg, torch.device("cuda", 0))
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    out = {
        "trainable_all_lora": bool(trainable) and all("lora_" in n for n in trainable),
        "base_frozen": all(not p.requires_grad for n, p in params.items() if "lora_" not in n),
        "adapted_modules": sorted({n.split(".")[-4] for n in trainable if "lora_A" in n}),
        "has_4bit": any(type(m).__name__ == "Linear4bit" for m in model.modules()),
        "device": str(next(p for p in params.values() if p.requires_grad).device),
    }
    with torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(1)
        for n, p in params.items():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.device, p.dtype))
    model.train()  # as during training: the scorer must switch to eval and back
    trained = probs(model, tok)
    out["trained_probs"] = trained.tolist()
    out["trained_probs_batch1"] = probs(model, tok, batch_size=1).tolist()
    out["still_training_mode_after_scoring"] = model.training
    backend.save_adapter(model, tok, adapter_dir)
    del model
    torch.cuda.empty_cache()

    loaded, ltok = backend.load_for_inference(cfg, adapter_dir, "cuda")
    out["loaded_probs"] = probs(loaded, ltok).tolist()
    # The shared prefix run once and reused through Unsloth's forward: the same probabilities.
    out["loaded_probs_whole_prompts"] = probs(loaded, ltok, reuse_prefix=False).tolist()
    out["prefix_tokens"] = len(LabelScorer(loaded, ltok, template, labels, 256, 4).prefix_ids)
    result = LabelScorer(loaded, ltok, template, labels, 256, 4).generate(sentences, max_new_tokens=3)
    out["generate_consistent"] = result.parse_failed.tolist() == [x is None for x in result.labels]
    print("RESULT " + json.dumps(out))
    """
)


def _run_unsloth(model_dir: str, tmp_path: Path) -> dict:
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed")
    script = tmp_path / "unsloth_check.py"
    script.write_text(UNSLOTH_SCRIPT)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
        UNSLOTH_COMPILE_LOCATION=str(tmp_path / "unsloth_cache"),
    )
    proc = subprocess.run(
        [sys.executable, str(script), model_dir, str(tmp_path / "adapter")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    assert lines, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _check(out: dict) -> None:
    assert out["trainable_all_lora"]
    assert out["base_frozen"]
    assert out["adapted_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert out["has_4bit"]
    assert out["device"].startswith("cuda")
    trained = np.array(out["trained_probs"])
    np.testing.assert_allclose(trained.sum(axis=1), 1.0, atol=1e-4)
    assert ((trained > 0) & (trained < 1)).all()
    # Left padding is handled in Unsloth's eval path too (bf16: loose tolerance).
    np.testing.assert_allclose(trained, np.array(out["trained_probs_batch1"]), atol=2e-2)
    assert out["still_training_mode_after_scoring"], "the scorer must restore train mode"
    # Same 4-bit base + the saved adapter: the same scores.
    np.testing.assert_allclose(np.array(out["loaded_probs"]), trained, atol=2e-2)
    assert out["prefix_tokens"] > 10
    np.testing.assert_allclose(np.array(out["loaded_probs"]), np.array(out["loaded_probs_whole_prompts"]), atol=2e-2)
    assert out["generate_consistent"]


def test_unsloth_backend_on_tiny_model(tiny_model_dir, tmp_path):
    _check(_run_unsloth(tiny_model_dir, tmp_path))


def test_unsloth_backend_on_demo_model(demo_model_dir, tmp_path):
    _check(_run_unsloth(demo_model_dir, tmp_path))


def test_hf_backend_qlora_on_gpu(tiny_cfg):
    """The hf backend's CUDA path: bitsandbytes 4-bit base, LoRA on top, kbit preparation."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    from sentiment_ray.backends import get_backend

    tiny_cfg.model.load_in_4bit = True
    tiny_cfg.model.dtype = "auto"
    tiny_cfg.lora.gradient_checkpointing = "true"
    model, tokenizer = get_backend("hf").load_for_training(tiny_cfg, "cuda")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)
    batch = tokenizer(["I love it", "terrible"], return_tensors="pt", padding=True).to("cuda")
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
