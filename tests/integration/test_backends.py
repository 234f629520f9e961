"""Backend selection, early unsloth import, and the hf (transformers + peft) backend on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sentiment_ray.backends import BackendError, get_backend, resolve_backend_name
from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate

SENTENCES = ["great value, works perfectly", "broke after a day", "so-so", "Me encanta este lugar"]


def scores(model, tokenizer, cfg) -> np.ndarray:
    from sentiment_ray.scoring import LabelScorer

    scorer = LabelScorer(model, tokenizer, PromptTemplate.from_config(cfg.prompt), LabelSet(cfg.prompt.labels), 128, batch_size=4)
    return scorer.score(SENTENCES).probs


# ----------------------------------------------------------------------------- selection


def test_resolve_backend_name_on_cpu():
    import torch

    assert not torch.cuda.is_available(), "this test describes the CPU machine"
    assert resolve_backend_name("auto") == "hf"
    assert resolve_backend_name("hf") == "hf"
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        resolve_backend_name("unsloth")
    with pytest.raises(BackendError, match="unknown model.backend 'vllm'"):
        resolve_backend_name("vllm")


def test_get_backend():
    assert get_backend("hf").name == "hf"
    with pytest.raises(BackendError, match="resolve_backend_name"):
        get_backend("auto")


def _run_with_fake_unsloth(tmp_path, body: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter where `import unsloth` is a stub that records the
    compile location it saw and which of transformers/trl/peft were imported before it."""
    fake = tmp_path / "fake" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os, sys\n"
        "SEEN_LOCATION = os.environ.get('UNSLOTH_COMPILE_LOCATION')\n"
        "IMPORTED_BEFORE = sorted(m for m in ('transformers', 'trl', 'peft') if m in sys.modules)\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "UNSLOTH_COMPILE_LOCATION"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), repo])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, env=env, timeout=120)


def test_early_import_sets_per_process_compile_dir_before_importing_unsloth(tmp_path):
    proc = _run_with_fake_unsloth(
        tmp_path,
        """
        import os, sys, tempfile, warnings
        warnings.simplefilter("error")
        from sentiment_ray.backends import early_import
        early_import("unsloth")
        import unsloth
        expected = os.path.join(tempfile.gettempdir(), "unsloth_cache", str(os.getpid()))
        assert unsloth.SEEN_LOCATION == expected, unsloth.SEEN_LOCATION
        assert os.path.isdir(expected)
        assert unsloth.IMPORTED_BEFORE == [], unsloth.IMPORTED_BEFORE
        early_import("unsloth")  # idempotent
        print("ok")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_early_import_keeps_a_preset_location_and_warns_when_too_late(tmp_path):
    proc = _run_with_fake_unsloth(
        tmp_path,
        """
        import warnings
        import transformers
        from sentiment_ray.backends import early_import
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            early_import("unsloth", compile_dir="/ignored/because/env/is/set")
        import unsloth
        assert unsloth.SEEN_LOCATION == "/preset/location", unsloth.SEEN_LOCATION
        assert any("transformers already imported before unsloth" in str(w.message) for w in caught), caught
        print("ok")
        """,
        env_extra={"UNSLOTH_COMPILE_LOCATION": "/preset/location"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_early_import_hf_is_a_no_op():
    from sentiment_ray.backends import early_import

    before = set(sys.modules)
    early_import("hf")
    assert "unsloth" not in set(sys.modules) - before


# ----------------------------------------------------------------------------- hf backend


def test_hf_training_model_has_trainable_lora_and_frozen_base(tiny_cfg):
    model, tokenizer = get_backend("hf").load_for_training(tiny_cfg, "cpu")
    assert tokenizer.pad_token is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable
    assert all("lora_" in n for n in trainable)
    assert all("lora_" not in n for n in frozen)
    assert any("embed_tokens" in n for n in frozen)
    # Every requested projection got an adapter, in every layer.
    for module in tiny_cfg.lora.target_modules:
        assert sum(f".{module}.lora_A." in n for n in trainable) == 2, module
    assert model.peft_config["default"].r == tiny_cfg.lora.r
    assert next(model.parameters()).dtype.is_floating_point
    assert str(next(model.parameters()).dtype) == "torch.float32"


def test_seeded_lora_init_depends_on_the_seed_and_names_only(tiny_cfg):
    """Whatever random numbers loading drew, the LoRA start is the same for a seed: the
    unsloth backend (same parameter names, same function) starts where hf does."""
    import torch

    from sentiment_ray.backends.base import reset_lora_weights

    torch.manual_seed(1)
    a, _ = get_backend("hf").load_for_training(tiny_cfg, "cpu")
    torch.manual_seed(2)
    torch.rand(1000)
    b, _ = get_backend("hf").load_for_training(tiny_cfg, "cpu")
    lora_a = {n: p for n, p in a.named_parameters() if ".lora_A." in n}
    assert lora_a
    assert all(float(p.abs().max()) > 0 for p in lora_a.values())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if "lora_" in name:
            assert torch.equal(p, q), name
    assert all(float(p.abs().max()) == 0 for n, p in a.named_parameters() if ".lora_B." in n)
    reset_lora_weights(b, seed=tiny_cfg.train.seed + 1)
    assert not torch.equal(dict(b.named_parameters())[next(iter(lora_a))], next(iter(lora_a.values())))


def test_hf_gradient_checkpointing_trains_only_lora(tiny_cfg):
    import torch

    tiny_cfg.lora.gradient_checkpointing = "true"
    model, tokenizer = get_backend("hf").load_for_training(tiny_cfg, "cpu")
    assert model.base_model.model.is_gradient_checkpointing
    model.train()
    batch = tokenizer(["I love it", "terrible"], return_tensors="pt", padding=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and torch.any(p.grad != 0)}
    assert grads
    assert all("lora_B" in n or "lora_A" in n for n in grads)


@pytest.mark.parametrize(
    "setting, gib, expected",
    [
        ("auto", 79.2, "false"),
        ("auto", 40.0, "false"),
        ("auto", 23.6, "unsloth"),
        ("auto", None, "unsloth"),
        ("unsloth", 79.2, "unsloth"),
        ("true", None, "true"),
        ("false", 8.0, "false"),
    ],
)
def test_auto_gradient_checkpointing_is_off_only_on_big_gpus(setting, gib, expected):
    from sentiment_ray.backends.base import resolve_gradient_checkpointing

    assert resolve_gradient_checkpointing(setting, gib) == expected


def test_auto_gradient_checkpointing_on_cpu_checkpoints(tiny_cfg):
    from sentiment_ray.backends.base import gradient_checkpointing_for

    tiny_cfg.lora.gradient_checkpointing = "auto"
    assert gradient_checkpointing_for(tiny_cfg, "cpu") == "unsloth"
    model, _ = get_backend("hf").load_for_training(tiny_cfg, "cpu")
    assert model.base_model.model.is_gradient_checkpointing  # hf: `unsloth` means plain checkpointing


def test_hf_keeps_existing_targets_and_errors_when_none_exist(tiny_cfg, caplog):
    tiny_cfg.lora.target_modules = ["q_proj", "query_key_value"]
    model, _ = get_backend("hf").load_for_training(tiny_cfg, "cpu")
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj"}
    assert "query_key_value" in caplog.text

    tiny_cfg.lora.target_modules = ["query_key_value", "dense"]
    with pytest.raises(BackendError, match=r"none of lora.target_modules \['query_key_value', 'dense'\].*q_proj"):
        get_backend("hf").load_for_training(tiny_cfg, "cpu")


def test_hf_save_adapter_and_load_for_inference_give_identical_scores(tiny_cfg, tmp_path):
    import torch

    backend = get_backend("hf")
    model, tokenizer = backend.load_for_training(tiny_cfg, "cpu")
    base_probs = scores(model, tokenizer, tiny_cfg)  # LoRA B starts at zero: same as base
    # Stand in for training: make the adapter change the model's output.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    trained_probs = scores(model, tokenizer, tiny_cfg)
    assert np.abs(trained_probs - base_probs).max() > 1e-3

    out = tmp_path / "adapter"
    backend.save_adapter(model, tokenizer, str(out))
    assert (out / "adapter_config.json").is_file()
    assert (out / "tokenizer_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # adapter only, never the base weights

    loaded, loaded_tok = backend.load_for_inference(tiny_cfg, str(out), "cpu")
    assert not loaded.training
    assert loaded.config.use_cache
    np.testing.assert_allclose(scores(loaded, loaded_tok, tiny_cfg), trained_probs, atol=1e-6)

    bare, bare_tok = backend.load_for_inference(tiny_cfg, None, "cpu")
    np.testing.assert_allclose(scores(bare, bare_tok, tiny_cfg), base_probs, atol=1e-6)


def test_hf_load_for_inference_rejects_a_folder_without_adapter(tiny_cfg, tmp_path):
    with pytest.raises(BackendError, match="no adapter_config.json"):
        get_backend("hf").load_for_inference(tiny_cfg, str(tmp_path), "cpu")


def test_hf_save_adapter_needs_a_peft_model(tiny_cfg, tmp_path):
    model, tokenizer = get_backend("hf").load_for_inference(tiny_cfg, None, "cpu")
    with pytest.raises(BackendError, match="needs a peft model"):
        get_backend("hf").save_adapter(model, tokenizer, str(tmp_path / "x"))


def test_backends_satisfy_protocol():
    from sentiment_ray.backends.base import Backend

    assert isinstance(get_backend("hf"), Backend)
    assert isinstance(get_backend("unsloth"), Backend)  # importable without unsloth installed


def test_unsloth_backend_refuses_cpu_before_importing_unsloth(tiny_cfg):
    for load in (
        lambda: get_backend("unsloth").load_for_training(tiny_cfg, "cpu"),
        lambda: get_backend("unsloth").load_for_inference(tiny_cfg, None, "cpu"),
    ):
        with pytest.raises(BackendError, match="needs a CUDA device, got cpu"):
            load()
    assert "unsloth" not in sys.modules
