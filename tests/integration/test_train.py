"""Fine-tuning on Ray Train (CPU, tiny random Llama): the trainer recipe, the outputs of a
run, the LoRA invariant, the saved adapter's scores, and resuming an interrupted run.

The first part runs in-process (no Ray). The Ray tests share one local cluster and one
baseline run per module (Ray startup and a run cost ~10-20 s each on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sentiment_ray import cluster as ray_cluster
from sentiment_ray import provenance as manifest
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.storage import Storage
from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CSV = REPO_ROOT / "data" / "demo" / "sentiment_demo.csv"


def make_cfg(model_dir: str, storage: Path, name: str = "tiny", **sections) -> ExperimentConfig:
    """tiny_cfg's settings (tests/conftest.py), built here so module-scoped fixtures can use it."""
    raw = {
        "model": {"name": model_dir, "backend": "hf", "load_in_4bit": False, "dtype": "float32", "max_seq_length": 128},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": "false"},
        "data": {"train_path": str(DEMO_CSV), "validation_fraction": 0.1, "max_train_rows": 64, "max_validation_rows": 32},
        "train": {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": 4,
            "warmup_steps": 0,
            "optim": "adamw_torch",
            "packing": False,
            "eval_batch_size": 16,
            "zero_shot_eval": True,
            "seed": 0,
            "learning_rate": 1e-3,
            "save_steps": 2,
        },
        "run": {
            "name": name,
            "storage_path": str(storage),
            "use_gpu": "false",
            "num_workers": 1,
            "cpus_per_worker": 1,
            "checkpoints_to_keep": 2,
        },
    }
    for section, values in sections.items():
        raw[section].update(values)
    return ExperimentConfig(**raw)


# ============================================================================ ray_cluster, manifest


def test_dashboard_url_is_not_a_ray_init_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ray_cluster.ClusterError, match="dashboard .* URL.*ray job submit"):
        ray_cluster.resolve_address("")
    # The config's address wins over the environment.
    assert ray_cluster.resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_cluster.resolve_address("") == ""  # -> a private local cluster


def test_resolve_use_gpu_explicit_and_invalid():
    assert ray_cluster.resolve_use_gpu("true") is True
    assert ray_cluster.resolve_use_gpu("false") is False
    with pytest.raises(ray_cluster.ClusterError, match="auto, true or false"):
        ray_cluster.resolve_use_gpu("yes")


def test_manifest_records_versions_commit_and_config(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv(manifest.GIT_COMMIT_ENV, "abc123")
    m = manifest.build_manifest(
        {"a": 1},
        data_fingerprint={"train": "f"},
        backend="hf",
        device="cpu",
        code_version=manifest.git_commit(),
        extra={"run_dir": "/x"},
    )
    assert m["git_commit"] == "abc123"
    assert m["config"] == {"a": 1}
    assert m["run_dir"] == "/x"
    assert m["packages"]["torch"] == torch.__version__
    assert m["packages"]["unsloth"] is None
    Storage(str(tmp_path)).write_json("m.json", m)
    assert json.loads((tmp_path / "m.json").read_text())["data_fingerprint"] == {"train": "f"}
    monkeypatch.delenv(manifest.GIT_COMMIT_ENV)
    sha = manifest.git_commit()
    assert sha is None or len(sha.split("-")[0]) == 40  # this checkout's HEAD ("-dirty" when edited)


# ============================================================================ trainer recipe (no Ray)


def test_sft_config_on_cpu(tiny_cfg, tmp_path):
    import torch

    from sentiment_ray.train.trainer import build_sft_config

    cpu = torch.device("cpu")
    tiny_cfg.train.optim = "adamw_8bit"
    tiny_cfg.train.eval_steps = 5
    args = build_sft_config(tiny_cfg, cpu, str(tmp_path), world_size=1)
    assert args.optim == "adamw_torch"  # 8-bit AdamW needs bitsandbytes on CUDA
    assert not args.bf16
    assert not args.fp16
    assert args.use_cpu  # TRL would default bf16 on
    assert not args.gradient_checkpointing  # the backend owns it
    assert args.completion_only_loss is True
    assert args.report_to == []
    assert args.save_steps == 5  # no save_steps: checkpoint at the evaluation cadence
    # padding_free=auto on CPU: padding-free rows; the records are pre-fitted to
    # max_seq_length, so TRL gets no max_length (it refuses one for unpacked padding-free rows).
    assert args.padding_free
    assert not args.packing
    assert args.max_length is None
    assert args.pad_to_multiple_of is None

    tiny_cfg.train.save_steps, tiny_cfg.train.loss_on, tiny_cfg.train.padding_free = 2, "full_text", "false"
    args = build_sft_config(tiny_cfg, cpu, str(tmp_path), world_size=1)
    assert args.save_steps == 2
    assert args.completion_only_loss is None
    assert not args.padding_free
    assert args.max_length == tiny_cfg.model.max_seq_length
    assert args.pad_to_multiple_of == tiny_cfg.train.pad_to_multiple_of
    tiny_cfg.train.save_steps = tiny_cfg.train.eval_steps = 0
    tiny_cfg.train.packing, tiny_cfg.train.padding_free = True, "auto"
    args = build_sft_config(tiny_cfg, cpu, str(tmp_path), 1)
    assert args.save_steps == tiny_cfg.train.max_steps
    assert args.packing
    assert args.padding_free
    assert args.max_length == tiny_cfg.model.max_seq_length


def test_padding_free_resolution():
    from sentiment_ray.train.trainer import resolve_padding_free

    assert resolve_padding_free("auto", packing=False, device_type="cpu")
    assert not resolve_padding_free("auto", packing=False, device_type="cuda")  # padded on GPUs
    assert resolve_padding_free("auto", packing=True, device_type="cuda")
    assert not resolve_padding_free("false", packing=False, device_type="cpu")
    assert resolve_padding_free("true", packing=False, device_type="cuda")


def _tiny_table(rows):
    import pyarrow as pa

    return pa.table({"sentence": [r[0] for r in rows], "label": [r[1] for r in rows]})


def test_train_records_keep_the_label_of_overlong_sentences(tiny_cfg):
    from transformers import AutoTokenizer

    from sentiment_ray.train.data import build_train_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_cfg.model.name)
    template = PromptTemplate.from_config(tiny_cfg.prompt)
    labels = LabelSet(tiny_cfg.prompt.labels)
    table = _tiny_table([("good " * 500, "Positive"), ("bad", "Negative")])

    ds = build_train_dataset(tiny_cfg, table, tokenizer, template, labels)
    assert ds.column_names == ["prompt", "completion"]
    assert ds[1] == template.prompt_completion("bad", "Negative", tokenizer.eos_token)
    long = ds[0]
    assert long["completion"] == "Positive" + tokenizer.eos_token
    full = tokenizer(long["prompt"] + long["completion"])["input_ids"]
    assert len(full) <= tiny_cfg.model.max_seq_length  # TRL's end truncation cannot cut the label
    assert long["prompt"].endswith(tiny_cfg.prompt.response_header)

    tiny_cfg.train.loss_on = "full_text"
    ds = build_train_dataset(tiny_cfg, table, tokenizer, template, labels)
    assert ds.column_names == ["text"]
    assert ds[1]["text"] == template.full_text("bad", "Negative", tokenizer.eos_token)


def test_bad_rows_are_quarantined_under_the_run_dir(tiny_cfg, tmp_path):
    from sentiment_ray.train.data import load_splits

    csv = tmp_path / "train.csv"
    good = "".join(f"r{i},sentence number {i},{'Positive' if i % 2 else 'Negative'},en\n" for i in range(20))
    csv.write_text("ID,sentence,label,lang\n" + good + "r99,a sentence,Neutral,en\n", encoding="utf-8")
    tiny_cfg.data.train_path, tiny_cfg.data.on_bad_rows = str(csv), "skip"
    tiny_cfg.data.max_train_rows = tiny_cfg.data.max_validation_rows = None
    labels = LabelSet(tiny_cfg.prompt.labels)

    splits = load_splits(tiny_cfg, labels, str(tmp_path / "run"))
    assert splits.bad_rows == {"train": 1}
    assert splits.train.num_rows + splits.validation.num_rows == 20
    [entry] = [json.loads(line) for line in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    assert entry["row"] == 21
    assert "label" in entry["reason"]
    # A configured quarantine path is used by rank 0 only; other ranks keep theirs local.
    tiny_cfg.data.quarantine_path = str(tmp_path / "q.jsonl")
    load_splits(tiny_cfg, labels, str(tmp_path / "rank1"), use_configured_quarantine=False)
    assert (tmp_path / "rank1" / "quarantine.jsonl").is_file()
    assert not (tmp_path / "q.jsonl").exists()
    load_splits(tiny_cfg, labels, str(tmp_path / "run"))
    assert (tmp_path / "q.jsonl").is_file()


def _train_in_process(cfg, output_dir, rows=32):
    """The worker's recipe (backend model, dataset, SFTConfig, trainer class) without Ray."""
    import torch

    from sentiment_ray.backends import get_backend
    from sentiment_ray.train.data import build_train_dataset, load_labelled
    from sentiment_ray.train.trainer import build_sft_config, build_sft_trainer

    labels = LabelSet(cfg.prompt.labels)
    model, tokenizer = get_backend("hf").load_for_training(cfg, torch.device("cpu"))
    table = load_labelled(cfg.data.train_path, cfg.data, labels).table.slice(0, rows)
    dataset = build_train_dataset(cfg, table, tokenizer, PromptTemplate.from_config(cfg.prompt), labels)
    args = build_sft_config(cfg, torch.device("cpu"), str(output_dir), world_size=1)
    args.save_strategy = "no"
    trainer = build_sft_trainer(model, args, dataset, tokenizer)
    return model, trainer


def _base_name(peft_name: str) -> str:
    # base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight -> model.layers.0.self_attn.q_proj.weight
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def test_lora_weights_change_and_base_weights_match_the_model_file(tiny_cfg, tmp_path):
    from safetensors.torch import load_file

    tiny_cfg.train.learning_rate = 1e-3
    model, trainer = _train_in_process(tiny_cfg, tmp_path / "out")
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.train()
    assert trainer.state.global_step == tiny_cfg.train.max_steps
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == tiny_cfg.train.max_steps
    assert all(np.isfinite(losses))

    base_file = load_file(os.path.join(tiny_cfg.model.name, "model.safetensors"))
    checked = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            assert not np.allclose(param.detach().numpy(), lora_before[name].numpy()), f"{name} did not train"
        else:
            assert not param.requires_grad, f"{name} is trainable"
            np.testing.assert_array_equal(param.detach().numpy(), base_file[_base_name(name)].numpy(), err_msg=name)
            checked += 1
    assert checked == len(base_file)  # every base tensor was compared


@contextlib.contextmanager
def _marked_as_4bit(model):
    """Inside: the model carries the flag TRL's SFTTrainer reads to treat it as quantised
    (transformers sets it when bitsandbytes loads a base in 4 bits, which needs CUDA).
    Only while the trainer is built: training itself would then count 4-bit parameters
    through bitsandbytes."""
    model.get_base_model().is_loaded_in_4bit = True
    try:
        yield model
    finally:
        del model.get_base_model().is_loaded_in_4bit


def test_lora_weights_are_float32_at_the_first_optimizer_step_over_a_4bit_base_with_bf16(tiny_cfg, tmp_path):
    """The hf backend trains float32 LoRA weights over a 4-bit base with bf16 mixed precision.

    On a CPU the base cannot be 4-bit, so the model is marked the way a bitsandbytes load
    marks it, which is what TRL's SFTTrainer reads before it casts the trainable weights of a
    quantised model to bfloat16. What this proves: the trainer's construction does cast them
    (the path is live), and the weights the first optimizer step updates are float32 all the
    same, and still are after training. Not proven here: bitsandbytes' 4-bit layers
    themselves (tests/gpu/test_backends_agree.py)."""
    import torch
    from transformers import TrainerCallback

    from sentiment_ray.backends.base import trainable_dtypes
    from sentiment_ray.train.trainer import sft_trainer_class

    tiny_cfg.model.dtype = "bfloat16"
    tiny_cfg.train.max_steps = 2
    model, trainer = _train_in_process(tiny_cfg, tmp_path / "plain", rows=16)
    assert trainer.args.bf16
    lora_elements = sum(p.numel() for p in model.parameters() if p.requires_grad)

    with _marked_as_4bit(model):
        sft_trainer_class()(
            model=model, args=trainer.args, train_dataset=trainer.train_dataset, processing_class=trainer.processing_class
        )
    assert trainable_dtypes(model.parameters()) == {"bfloat16": lora_elements}, "TRL no longer casts"

    class FirstStepDtypes(TrainerCallback):
        seen = None

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if self.seen is None:
                self.seen = trainable_dtypes(p for group in optimizer.param_groups for p in group["params"])

    from sentiment_ray.train.trainer import build_sft_trainer

    first_step = FirstStepDtypes()
    with _marked_as_4bit(model):
        trainer = build_sft_trainer(model, trainer.args, trainer.train_dataset, trainer.processing_class, callbacks=[first_step])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert first_step.seen == {"float32": lora_elements}
    assert trainable_dtypes(model.parameters()) == {"float32": lora_elements}
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_training_refuses_to_start_on_lora_weights_that_are_not_float32(tiny_cfg, tmp_path):
    """Whatever casts the LoRA weights after the trainer is built, the first step finds it."""
    import torch

    from sentiment_ray.train.trainer import LoraDtypeError

    model, trainer = _train_in_process(tiny_cfg, tmp_path / "out", rows=8)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    with pytest.raises(LoraDtypeError, match="bfloat16"):
        trainer.train()
    assert trainer.state.global_step == 0


def _lora_update_over_3_sgd_steps(cfg, output_dir, rows):
    """(LoRA weights after minus before 3 optimizer steps, the logged losses, the label
    tokens of each micro-batch) of the project's trainer on `cfg`. Plain SGD: the update is
    the learning rate times the gradient, so a loss scaled differently shows (Adam's first
    steps would hide it)."""

    from sentiment_ray.train.trainer import build_sft_trainer, sft_trainer_class

    label_tokens = []

    class CountingTrainer(sft_trainer_class()):
        def training_step(self, model, inputs, *args, **kwargs):
            label_tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    cfg.train.optim, cfg.train.learning_rate, cfg.train.max_steps = "sgd", 0.5, 3
    model, trainer = _train_in_process(cfg, output_dir, rows=rows)
    trainer = build_sft_trainer(
        model, trainer.args, trainer.train_dataset, trainer.processing_class, trainer_class=CountingTrainer
    )
    assert len(trainer.train_dataset) >= 3 * 8  # three steps inside one epoch, whatever the cut
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    update = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps == 8
    return update, losses, label_tokens


@pytest.mark.parametrize("packing, loss_on", [(True, "completion"), (False, "completion"), (False, "full_text")])
def test_the_update_is_the_same_however_the_global_batch_is_cut(tiny_cfg, tmp_path, packing, loss_on):
    """8 rows per optimizer step as 4 micro-batches of 2 or as one of 8 give the same LoRA
    update, step after step, within float32 rounding: the loss is the summed token NLL of
    the whole step over its label-token count, however many forward passes it took."""
    import torch

    tiny_cfg.train.packing, tiny_cfg.train.loss_on = packing, loss_on
    tiny_cfg.train.per_device_train_batch_size, tiny_cfg.train.gradient_accumulation_steps = 2, 4
    cut_in_4, losses_4, tokens_4 = _lora_update_over_3_sgd_steps(tiny_cfg, tmp_path / "micro2", rows=64)
    tiny_cfg.train.micro_batch_size = 8
    whole, losses_1, tokens_1 = _lora_update_over_3_sgd_steps(tiny_cfg, tmp_path / "micro8", rows=64)

    assert (len(tokens_4), len(tokens_1)) == (12, 3)
    assert [sum(tokens_4[i : i + 4]) for i in (0, 4, 8)] == tokens_1  # the same rows in each step
    if packing or loss_on == "full_text":
        # Micro-batches of unequal label counts: a mean per micro-batch would weigh tokens otherwise.
        assert len(set(tokens_4)) > 1
    assert losses_4 == pytest.approx(losses_1, rel=1e-5)
    scale = max(float(u.abs().max()) for u in whole.values())
    assert scale > 1e-3  # the weights moved
    for name, update in whole.items():
        assert torch.allclose(cut_in_4[name], update, rtol=1e-4, atol=1e-5 * scale), name


def test_packed_batches_compute_the_same_loss_as_padded_ones(tiny_model_dir):
    """TRL's BFD packing is padding-free (no attention mask, restarting position_ids); on
    sdpa/eager, transformers builds a per-sequence causal mask from the position_ids, so a
    packed batch gives the same loss as the padded one (no cross-sequence attention). Only
    without a KV cache, as in training (the trainer forwards with use_cache=False)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    rows = [{"input_ids": list(range(5, 17))}, {"input_ids": list(range(40, 47))}, {"input_ids": list(range(90, 110))}]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[0] == 1

    def summed_nll(batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )

    with torch.no_grad():
        assert torch.allclose(summed_nll(padded), summed_nll(packed), rtol=1e-5)
        # The check has power: the same packed ids with one running position range attend across rows.
        crossed = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        assert abs(summed_nll(padded) - summed_nll(crossed)) > 0.05


def test_padding_free_training_loss_equals_padded(tiny_cfg, tmp_path):
    """The trainer's loss on a padding-free batch (CPU default) equals the padded batch's."""
    import torch

    tiny_cfg.train.padding_free = "true"
    model, free = _train_in_process(tiny_cfg, tmp_path / "free", rows=8)
    tiny_cfg.train.padding_free = "false"
    _, padded = _train_in_process(tiny_cfg, tmp_path / "padded", rows=8)
    rows = [free.train_dataset[i] for i in range(8)]
    free_batch, padded_batch = free.data_collator(rows), padded.data_collator(rows)
    assert free_batch["input_ids"].shape[0] == 1
    assert "attention_mask" not in free_batch
    assert padded_batch["input_ids"].shape[0] == 8
    model.eval()
    with torch.no_grad():
        n = int((padded_batch["labels"] != -100).sum())
        loss_free = free.compute_loss(model, dict(free_batch), num_items_in_batch=n)
        loss_padded = padded.compute_loss(model, dict(padded_batch), num_items_in_batch=n)
    assert torch.allclose(loss_free, loss_padded, rtol=1e-5), (loss_free, loss_padded)


def test_label_position_logits_give_the_full_logits_loss_and_gradients(tiny_cfg, tmp_path):
    """On CPU the trainer asks for logits only where a label is predicted; the loss and the
    LoRA gradients equal those of the model's own full-logits loss, padded and padding-free."""
    import torch
    import transformers

    from sentiment_ray.train.trainer import keep_label_position_logits

    for padding_free in ("true", "false"):
        tiny_cfg.train.padding_free = padding_free
        model, trainer = _train_in_process(tiny_cfg, tmp_path / padding_free, rows=8)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        kept = keep_label_position_logits(dict(batch))
        assert kept["logits_to_keep"].numel() < batch["input_ids"].shape[1] / 3
        n = int((batch["labels"] != -100).sum())

        def loss_and_grads(compute):
            model.zero_grad()
            loss = compute(model, dict(batch), num_items_in_batch=n)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            return loss.detach(), grads

        fast_loss, fast_grads = loss_and_grads(trainer.compute_loss)
        full_loss, full_grads = loss_and_grads(
            lambda m, b, **kw: transformers.Trainer.compute_loss(trainer, m, {**b, "use_cache": False}, **kw)
        )
        assert torch.allclose(fast_loss, full_loss, rtol=1e-5), (padding_free, fast_loss, full_loss)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(fast_grads, full_grads))


def test_packing_trains_on_cpu(tiny_cfg, tmp_path):
    tiny_cfg.train.packing = True
    tiny_cfg.train.max_steps = 2
    _, trainer = _train_in_process(tiny_cfg, tmp_path / "out", rows=48)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch
    assert "attention_mask" not in batch  # padding-free packed rows
    trainer.train()
    assert trainer.state.global_step == 2


def test_wrapped_packing_gives_dense_blocks_and_trains(tiny_cfg, tmp_path):
    """`wrapped` (classic packing): full max_seq_length blocks, no per-row positions, the
    label tokens still the only loss positions."""
    tiny_cfg.train.packing = True
    tiny_cfg.train.packing_strategy = "wrapped"
    tiny_cfg.train.max_steps = 2
    _, trainer = _train_in_process(tiny_cfg, tmp_path / "out", rows=48)
    assert trainer.args.padding_free is False
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == tiny_cfg.model.max_seq_length
    assert "position_ids" not in batch or bool((batch["position_ids"][:, 1:] > 0).all())
    labelled = (batch["labels"] != -100).sum()
    assert 0 < labelled < batch["input_ids"].numel() / 5  # completion tokens only
    trainer.train()
    assert trainer.state.global_step == 2


def test_group_by_length_batches_rows_of_similar_length(tiny_cfg, tmp_path):
    tiny_cfg.train.packing = False
    tiny_cfg.train.padding_free = "false"
    tiny_cfg.train.group_by_length = True
    tiny_cfg.train.per_device_train_batch_size = 4
    _, trainer = _train_in_process(tiny_cfg, tmp_path / "out", rows=64)
    assert trainer.args.train_sampling_strategy == "group_by_length"
    batches = list(trainer.get_train_dataloader())
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    assert real / padded > 0.7, real / padded


# ============================================================================ Ray Train runs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray_cluster.connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("train-runs")


@pytest.fixture(scope="module")
def baseline(ray_local, tiny_model_dir, runs_root):
    """One uninterrupted 4-step run (checkpoints at steps 2 and 4): (config, summary)."""
    from sentiment_ray.train.recipe import run_training

    cfg = make_cfg(tiny_model_dir, runs_root, name="baseline")
    return cfg, run_training(cfg)


def _read(run_dir: str, name: str) -> dict:
    return json.loads((Path(run_dir) / name).read_text())


@pytest.mark.slow
def test_run_writes_metrics_manifest_and_adapter(baseline):
    from sentiment_ray.io.files import fingerprint

    cfg, summary = baseline
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    assert summary["run_dir"] == str(run_dir)
    assert summary["adapter"] == str(run_dir / "adapter")
    assert summary["backend"] == "hf"
    assert summary["device"] == "cpu"
    assert summary["steps"] == 4

    metrics = _read(summary["run_dir"], "metrics.json")
    assert metrics["rows"]["validation"] == 32
    assert metrics["rows"]["train"] == 64
    for key in ("zero_shot", "fine_tuned"):
        report = metrics[key]
        assert report["n"] == 32
        assert 0 <= report["accuracy"] <= 1
        assert 0 <= report["macro_f1"] <= 1
        assert sum(v["n"] for v in report["per_language"].values()) == 32
    assert summary["fine_tuned"]["accuracy"] == metrics["fine_tuned"]["accuracy"]
    train = metrics["train"]
    assert train["global_step"] == 4
    assert train["resumed_from_step"] == 0
    assert train["steps_this_attempt"] == 4
    assert [e["step"] for e in train["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert train["optimizer"] == "adamw_torch"
    assert train["gradient_checkpointing"] == "false"
    assert train["tokens_this_attempt"] > 0
    assert train["tokens_per_second"] > 0
    assert train["batches"] == {
        "global_batch_size": 4,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "chosen_by": "config",
    }
    assert metrics["peak_gpu_memory_gb"] is None  # CPU
    # The temperature fitted on the validation split travels with the adapter; the report
    # compares zero-shot and fine-tuned, per language, and shows calibration before and after.
    calibration = json.loads((run_dir / "adapter" / "calibration.json").read_text())
    assert calibration["temperature"] > 0
    assert calibration["rows"] == 32
    assert metrics["calibration"]["temperature"] == calibration["temperature"]
    assert metrics["calibration"]["ece_before"] >= 0
    assert metrics["calibration"]["ece_after"] >= 0
    # One ECE: fine_tuned.ece is the model's own, ece_calibrated the out-of-fold calibrated one.
    assert metrics["fine_tuned"]["ece"] == pytest.approx(metrics["calibration"]["ece_before"])
    assert metrics["fine_tuned"]["ece_calibrated"] == metrics["calibration"]["ece_after"]
    # What the adapter knows: the languages and labels of its training and calibration rows,
    # and the calibration rows' scores, from which a label job certifies its label.max_error.
    profile = json.loads((run_dir / "adapter" / "data_profile.json").read_text())
    assert profile["train"]["rows"] == 64
    assert profile["calibration"]["rows"] == 32
    assert set(profile["calibration"]["languages"]) == set(metrics["fine_tuned"]["per_language"])
    assert sum(profile["train"]["labels"].values()) == pytest.approx(1.0, abs=1e-3)
    assert profile["languages_from"] == "the data's language column"
    assert metrics["data_profile"] == profile
    scores = json.loads((run_dir / "adapter" / "risk_control.json").read_text())
    assert scores["rows"] == 32
    assert scores["confidence"] == sorted(scores["confidence"], reverse=True)
    assert sum(scores["correct"]) == round(metrics["fine_tuned"]["accuracy"] * 32)
    assert metrics["risk_control"]["delta"] == 0.05
    assert [p["coverage"] for p in metrics["risk_control"]["curve"]][-1] == 1.0
    assert {c["lang"] for c in metrics["languages"]} == set(metrics["fine_tuned"]["per_language"])
    assert summary["calibration"]["temperature"] == calibration["temperature"]
    assert summary["languages_made_worse"] == [c["lang"] for c in metrics["languages"] if c["worse"]]
    report = (run_dir / "report.html").read_text()
    assert all(
        f'id="{i}"' in report
        for i in (
            "comparison",
            "languages",
            "calibration",
            "reliability-before",
            "reliability-after",
            "risk-coverage",
            "data-profile",
        )
    )
    assert 'id="run-details"' in report
    assert cfg.model.name in report
    assert " UTC" in report  # what the page is about
    assert all(
        c["verdict"] in ("worse", "lower, within noise", "not worse") and 0 <= c["drop_likelihood"] <= 1
        for c in metrics["languages"]
    )  # the zero-shot predictions were kept for the comparison

    m = _read(summary["run_dir"], "manifest.json")
    assert m["config"]["model"]["name"] == cfg.model.name
    assert m["config"]["run"]["storage_path"] == cfg.run.storage_path
    assert m["data_fingerprint"] == {"train": fingerprint([str(DEMO_CSV)])}
    assert m["backend"] == "hf"
    assert m["device"] == "cpu"
    assert m["packages"]["ray"] == "2.60.0"
    assert m["packages"]["trl"]
    # NVLink multicast is the user's setting: recorded as the worker saw it, never forced.
    assert m["worker_env"] == {name: os.environ.get(name) for name in ray_cluster.NVLINK_MULTICAST_VARS}
    # Ray Train kept the last two checkpoints in the run folder.
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]


@pytest.mark.slow
def test_adapter_holds_only_trained_lora_weights(baseline):
    from safetensors.torch import load_file

    _, summary = baseline
    weights = load_file(os.path.join(summary["adapter"], "adapter_model.safetensors"))
    assert weights
    assert all("lora_" in name for name in weights)  # no base weights saved
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b
    assert all(float(w.abs().max()) > 0 for w in lora_b)  # B starts at zero: it trained


@pytest.mark.slow
def test_saved_adapter_reproduces_the_reported_validation_scores(baseline):
    import pyarrow.parquet as pq
    import torch

    from sentiment_ray.backends import get_backend
    from sentiment_ray.scoring import LabelScorer
    from sentiment_ray.train.evaluation import evaluate_split

    cfg, summary = baseline
    predictions = pq.read_table(os.path.join(summary["run_dir"], "validation_predictions.parquet"))
    assert predictions.num_rows == 32
    model, tokenizer = get_backend("hf").load_for_inference(cfg, summary["adapter"], torch.device("cpu"))
    # The reported probabilities are calibrated: the adapter's temperature applies.
    temperature = json.loads(open(os.path.join(summary["adapter"], "calibration.json")).read())["temperature"]
    scorer = LabelScorer(
        model,
        tokenizer,
        PromptTemplate.from_config(cfg.prompt),
        LabelSet(cfg.prompt.labels),
        max_length=cfg.model.max_seq_length,
        batch_size=cfg.train.eval_batch_size,
        temperature=temperature,
    )
    sentences = predictions.column("sentence").to_pylist()
    probs = scorer.score(sentences).probs
    reported = np.stack([predictions.column(f"calibrated_p_{label}").to_numpy() for label in cfg.prompt.labels], axis=1)
    np.testing.assert_allclose(probs, reported, atol=1e-4)

    report, _ = evaluate_split(scorer, predictions)
    assert report["accuracy"] == summary["fine_tuned"]["accuracy"]
    assert report["macro_f1"] == pytest.approx(summary["fine_tuned"]["macro_f1"])
    # The fine-tuned adapter is not the base model: its scores differ from zero-shot ones.
    base, _ = get_backend("hf").load_for_inference(cfg, None, torch.device("cpu"))
    base_probs = LabelScorer(base, tokenizer, scorer.template, scorer.labels, 128, 16).score(sentences).probs
    assert np.abs(base_probs - probs).max() > 1e-3


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(baseline, tiny_model_dir, runs_root, monkeypatch):
    import ray.train
    from safetensors.torch import load_file

    from sentiment_ray.train.recipe import run_training
    from sentiment_ray.train.trainer import FAIL_AT_STEP_ENV

    base_cfg, base_summary = baseline
    cfg = make_cfg(tiny_model_dir, runs_root, name="resume")
    run_dir = Path(cfg.run.storage_path) / cfg.run.name

    # Attempt 1: checkpoint at step 2, then the worker fails after step 3 (max_failures=0).
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")
    with pytest.raises(ray.train.TrainingFailedError, match="test-injected failure after step 3"):
        run_training(cfg)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert not (run_dir / "metrics.json").exists()

    # Attempt 2: same name and storage path -> Ray Train restores the run, HF resumes at step 2.
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    summary = run_training(cfg)
    train = _read(summary["run_dir"], "metrics.json")["train"]
    assert train["resumed_from_step"] == 2
    assert train["steps_this_attempt"] == 2
    assert train["global_step"] == 4
    with open(run_dir / "checkpoint-000002" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 2

    # Continuing from the checkpoint reproduces the uninterrupted run: same losses at steps
    # 3-4 (same weights, optimizer state, RNG and data order) and the same adapter.
    base_train = _read(base_summary["run_dir"], "metrics.json")["train"]
    losses = {e["step"]: e["loss"] for e in train["log_history"] if "loss" in e}
    base_losses = {e["step"]: e["loss"] for e in base_train["log_history"] if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert losses[step] == pytest.approx(base_losses[step], rel=1e-5), step
    adapter = load_file(os.path.join(summary["adapter"], "adapter_model.safetensors"))
    base_adapter = load_file(os.path.join(base_summary["adapter"], "adapter_model.safetensors"))
    for name, tensor in adapter.items():
        np.testing.assert_allclose(tensor.numpy(), base_adapter[name].numpy(), atol=1e-6, err_msg=name)
    # The zero-shot scores came with the checkpoint (not recomputed on the resumed model).
    assert summary["zero_shot"] == base_summary["zero_shot"]


@pytest.mark.slow
def test_keep_best_and_early_stopping_keep_the_best_evaluations_adapter(ray_local, tiny_model_dir, runs_root):
    """Evaluated every step, stopped after two evaluations without a better macro-F1; the
    saved adapter is the best evaluation's: its validation metrics are the best reported."""
    from sentiment_ray.train.recipe import run_training

    cfg = make_cfg(
        tiny_model_dir,
        runs_root,
        name="keep-best",
        train={
            "max_steps": 12,
            "eval_steps": 1,
            "save_steps": 0,
            "learning_rate": 5e-3,
            "keep_best": True,
            "early_stopping_patience": 2,
            "calibrate": False,
            "zero_shot_eval": False,
        },
    )
    summary = run_training(cfg)
    metrics = _read(summary["run_dir"], "metrics.json")
    train = metrics["train"]
    assert train["kept"] == "best"
    assert train["best_step"] is not None
    if train["stopped_early_at_step"] is not None:
        assert train["global_step"] == train["stopped_early_at_step"] < 12
        assert train["stopped_early_at_step"] - train["best_step"] >= 2
    assert metrics["fine_tuned"]["macro_f1"] == pytest.approx(train["best_val_macro_f1"])
