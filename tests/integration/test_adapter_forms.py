"""The labeller's adapter forms on CPU (tiny random Llama, float32): the merged adapter
scores like peft's layers, the merge leaves a plain model, and a scoring forward that does
not compile falls back to the eager one with one warning."""

from __future__ import annotations

import numpy as np
import pytest
from test_scoring import SENTENCES  # the same multilingual sentences


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """An adapter on all seven projections with non-zero B matrices (it changes the scores)."""
    from tiny_model import build_tiny_adapter

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = tmp_path_factory.mktemp("adapter-all-projections")
    return build_tiny_adapter(tiny_model_dir, out, targets, seed=1, b_std=0.3)


def _labeler(tiny_cfg, adapter, **label):
    from sentiment_ray.label.labeler import Labeler

    cfg = tiny_cfg.model_copy(deep=True)
    for key, value in label.items():
        setattr(cfg.label, key, value)
    return Labeler(cfg, adapter_path=adapter, device="cpu")


def _probs(labeler) -> np.ndarray:
    columns, _ = labeler.predict(SENTENCES)
    return np.stack([columns["p_Positive"].to_numpy(), columns["p_Negative"].to_numpy()], axis=1)


def test_merged_adapter_scores_like_peft_layers(tiny_cfg, lora_adapter):
    merged = _labeler(tiny_cfg, lora_adapter, merge_adapter="true")
    unmerged = _labeler(tiny_cfg, lora_adapter, merge_adapter="false")
    base = _labeler(tiny_cfg, None)
    assert (merged.adapter_form.form, unmerged.adapter_form.form, base.adapter_form.form) == ("merged", "unmerged", "none")
    assert np.abs(_probs(unmerged) - _probs(base)).max() > 0.01  # the adapter matters
    np.testing.assert_allclose(_probs(merged), _probs(unmerged), atol=1e-5)


def test_auto_merges_on_a_cpu(tiny_cfg, lora_adapter):
    labeler = _labeler(tiny_cfg, lora_adapter, compile="auto")
    assert labeler.adapter_form.form == "merged"
    assert labeler.scorer.compiled is False  # label.compile=auto compiles on a GPU only


def test_the_merged_model_is_plain_transformers_without_lora(tiny_cfg, lora_adapter):
    import torch

    labeler = _labeler(tiny_cfg, lora_adapter, merge_adapter="true")
    model = labeler.scorer.model
    assert type(model).__module__.startswith("transformers.")
    assert not [name for name, _ in model.named_parameters() if "lora_" in name]
    linears = {type(m) for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
    assert linears == {torch.nn.Linear}


def test_a_forward_that_does_not_compile_falls_back_to_eager_with_one_warning(tiny_cfg, lora_adapter, monkeypatch):
    import torch

    eager = _probs(_labeler(tiny_cfg, lora_adapter, compile="false"))

    def broken_compile(model, **kwargs):
        def forward(**inputs):
            raise RuntimeError("inductor: no C++ compiler found\nmore details")

        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(
        RuntimeWarning, match=r"did not compile \(RuntimeError: inductor: no C\+\+ compiler found\); scoring eagerly"
    ) as caught:
        labeler = _labeler(tiny_cfg, lora_adapter, compile="true")
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert labeler.scorer.compiled is False
    np.testing.assert_allclose(_probs(labeler), eager, atol=1e-6)


def test_a_compiled_forward_scores_like_the_eager_one(tiny_cfg, lora_adapter):
    pytest.importorskip("torch._inductor")
    eager = _probs(_labeler(tiny_cfg, lora_adapter, compile="false"))
    labeler = _labeler(tiny_cfg, lora_adapter, compile="true")
    if not labeler.scorer.compiled:
        pytest.skip("torch.compile is not usable on this machine (the fallback is tested above)")
    assert labeler.scorer.compile_seconds > 0
    np.testing.assert_allclose(_probs(labeler), eager, atol=1e-4)


def test_when_the_fused_forwards_fail_the_adapter_runs_as_peft_layers_with_one_warning(tiny_cfg, lora_adapter):
    from sentiment_ray.backends.adapter_forms import AdapterFormError, prepare_adapter
    from sentiment_ray.backends.hf import HFBackend

    class CannotFuse(HFBackend):
        def can_fuse(self, model):
            return True

        def apply_adapter_form(self, model, form):
            if form == "fused":
                raise AdapterFormError("Unsloth could not fuse this adapter's LoRA forwards (NotImplementedError: phi3)")
            return super().apply_adapter_form(model, form)

    model, _ = HFBackend().load_for_inference(tiny_cfg, lora_adapter, "cpu")
    with pytest.warns(RuntimeWarning, match=r"could not fuse .*\(NotImplementedError: phi3\); labelling with peft's LoRA layers"):
        model, choice = prepare_adapter(CannotFuse(), model, "false", 2048)
    assert choice.form == "unmerged"
    assert "the fused forwards failed" in choice.reason
    assert hasattr(model, "peft_config")
