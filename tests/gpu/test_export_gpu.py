"""GPU only: `jobs/export.py` on the unsloth backend (Unsloth's merged 16-bit save) with the
real demo model; the merged folder loads in plain transformers and scores like the 4-bit base
+ adapter. Skips without CUDA. Each step runs in a fresh interpreter (Unsloth must be imported
before transformers in its process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_models]

REPO_ROOT = Path(__file__).resolve().parents[2]

MAKE_ADAPTER = textwrap.dedent(
    """
    import sys, torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    """
)

SCORE = textwrap.dedent(
    """
    import json, sys, torch
    from sentiment_ray.config import load_config
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.prompts import PromptTemplate
    from sentiment_ray.scoring import LabelScorer
    folder, adapter = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    cfg = load_config("demo", ["model.backend=hf"])
    sentences = ["I love this phone", "terrible service, never again", "meh", "El servicio fue excelente"]
    if adapter:   # the reference: 4-bit base + adapter through the hf backend
        from sentiment_ray.backends.hf import HFBackend
        model, tok = HFBackend().load_for_inference(cfg, adapter, "cuda")
    else:         # the merged folder through plain transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
        tok = AutoTokenizer.from_pretrained(folder)
    result = LabelScorer(model, tok, PromptTemplate.from_config(cfg.prompt), LabelSet(cfg.prompt.labels), 256, 4).score(sentences)
    print(json.dumps(result.probs.tolist()))
    """
)


def _run(args: list[str]) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_unsloth_merged_16bit_export_loads_in_plain_transformers(demo_model_dir, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    _run(["-c", MAKE_ADAPTER, demo_model_dir, str(adapter)])
    line = _run(
        ["jobs/export.py", "--config", "demo", "model.backend=unsloth", "--adapter", str(adapter), "--output", str(merged)]
    )
    summary = json.loads(line.strip().splitlines()[-1])
    assert summary["backend"] == "unsloth"
    assert (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    reference = np.array(json.loads(_run(["-c", SCORE, "-", str(adapter)]).strip().splitlines()[-1]))
    exported = np.array(json.loads(_run(["-c", SCORE, str(merged)]).strip().splitlines()[-1]))
    # 4-bit base vs dequantised 16-bit merge: close, not equal.
    np.testing.assert_allclose(exported, reference, atol=0.1)
