"""The training machinery inside a Ray Train worker: TRL's SFTConfig from the config, the
SFTTrainer subclass, the callback that evaluates and reports to Ray Train, and restoring a
Ray checkpoint into the HF Trainer.

Reporting cadence (what Ray Train, and a Tune scheduler behind it, sees): one
`ray.train.report` per checkpoint (every `train.save_steps`, or every `train.eval_steps` when
save_steps is 0, and always at the last step), plus one per evaluation step that is not a
checkpoint step. Reports at evaluation steps and at the last step carry `val_accuracy`,
`val_macro_f1` and `val_ece` (label-token scoring of the validation split).

transformers and trl are imported inside functions: Unsloth must be imported before them in
a worker (backends.early_import), and the driver never needs them. The classes that subclass
theirs are built on first use (`sft_trainer_class`, `report_callback_class`).
"""

from __future__ import annotations

import json
import logging
import os
import time

from sentiment_ray import compat
from sentiment_ray.backends.base import gradient_checkpointing_for, resolve_dtype, train_lora_in_float32, trainable_dtypes
from sentiment_ray.bench.flops import ModelShape
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.storage import local_atomic_dir
from sentiment_ray.train import batching, layout
from sentiment_ray.train.evaluation import evaluate_split, flat_validation_metrics

log = logging.getLogger(__name__)

# Test hook: the worker raises after this optimizer step on a run that did not resume from a
# checkpoint (the resume tests interrupt a run with it, then resume it).
FAIL_AT_STEP_ENV = "SENTIMENT_RAY_TEST_FAIL_AT_STEP"
# Optimizers that need bitsandbytes / CUDA; on CPU they become plain AdamW.
_CUDA_ONLY_OPTIMIZER_MARKERS = ("8bit", "paged", "bnb")


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- trainer config


def resolve_optimizer(name: str, device_type: str) -> str:
    if device_type != "cuda" and any(marker in name for marker in _CUDA_ONLY_OPTIMIZER_MARKERS):
        log.info("optimizer %s needs bitsandbytes on CUDA; using adamw_torch on %s", name, device_type)
        return "adamw_torch"
    return name


def checkpoint_every(cfg: ExperimentConfig) -> int:
    """Checkpoint cadence in steps: train.save_steps, else train.eval_steps, else the end."""
    return cfg.train.save_steps or cfg.train.eval_steps or cfg.train.max_steps


def resolve_padding_free(setting: str, packing: bool, device_type: str, packing_strategy: str = "bfd") -> bool:
    """Explicit, never left to the backend: Unsloth switches padding-free on by itself on
    Hopper GPUs, and without flash-attention that runs attention once per sequence: many
    small kernels that leave the GPU mostly idle, where a padded batch is one kernel.

    `auto`: padding-free with packing (TRL's BFD packing is padding-free by construction)
    and on CPU, where transformers runs one attention call per layer over the concatenated
    rows with a per-sequence mask built from position_ids: the same loss as a padded batch
    (tests/integration/test_train.py) without computing the padding, which is most of a
    padded batch of short rows (one long row sets the width)."""
    if setting == "auto":
        if packing:
            return packing_strategy == "bfd"  # wrapped blocks are full: nothing to pad
        return device_type == "cpu"
    return setting == "true"


def plan_batches(cfg: ExperimentConfig, model, device, backend_name: str) -> batching.BatchPlan:
    """This worker's cut of its share of the global batch (train/batching.py). With
    `train.micro_batch_size: auto` on a GPU: the largest that fits the memory left free once
    `model` is loaded, agreed by every worker (the smallest of their choices), so that they
    run the same number of forward passes per optimizer step."""
    import torch

    planned = batching.configured_plan(cfg.train, on_gpu=device.type == "cuda")
    if planned is not None:
        return planned
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's cache is reusable
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = resolve_optimizer(cfg.train.optim, device.type)
    budget = batching.activation_budget(free, trainable, eight_bit_optimizer="8bit" in optimizer)
    per_row = batching.activation_bytes_per_row(
        ModelShape.from_config(getattr(model.config, "text_config", None) or model.config),
        seq_len=cfg.model.max_seq_length,
        backend=backend_name,
        gradient_checkpointing=gradient_checkpointing_for(cfg, device),
        attention=cfg.model.attn_implementation,
    )
    micro = batching.micro_batch_that_fits(batching.worker_share(cfg.train), budget_bytes=budget, bytes_per_row=per_row)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor([micro], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        micro = int(agreed.item())
    log.info(
        "micro-batch %d x %d accumulation steps per optimizer step: %.1f GiB free for activations, %.2f GiB per row (estimated)",
        micro,
        batching.worker_share(cfg.train) // micro,
        budget / 2**30,
        per_row / 2**30,
    )
    return batching.cut(cfg.train, micro, "memory")


def build_sft_config(cfg: ExperimentConfig, device, output_dir: str, world_size: int, batches: batching.BatchPlan | None = None):
    """TRL SFTConfig from cfg.train (and model.max_seq_length); micro-batches and gradient
    accumulation from `batches` (plan_batches), else as the config fixes them (on a GPU,
    `train.micro_batch_size: auto` needs a plan)."""
    import torch
    from trl import SFTConfig

    t = cfg.train
    batches = batches or batching.configured_plan(t, on_gpu=device.type == "cuda")
    if batches is None:
        raise ValueError("train.micro_batch_size=auto on a GPU: pass the plan_batches(...) of the loaded model")
    cuda = device.type == "cuda"
    dtype = resolve_dtype(cfg.model.dtype, device)
    padding_free = resolve_padding_free(t.padding_free, t.packing, device.type, t.packing_strategy)
    if padding_free and cfg.model.attn_implementation != "flash_attention_2":
        # Padding-free rows (TRL's BFD packing, or padding_free) are concatenated with
        # restarting position_ids and no attention mask. TRL warns this may cross-contaminate
        # without flash-attention, but transformers' sdpa/eager mask builder derives a
        # per-sequence (block-diagonal) causal mask from such position_ids (masking_utils.
        # find_packed_sequence_indices) when no KV cache is passed, as in training (the
        # trainer forwards with use_cache=False); tests/integration/test_train.py checks packed == padded loss.
        log.info("padding-free rows with %s attention: per-sequence masks come from position_ids", cfg.model.attn_implementation)
    return SFTConfig(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=batches.micro_batch_size,
        gradient_accumulation_steps=batches.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=resolve_optimizer(t.optim, device.type),
        seed=t.seed,
        data_seed=t.seed,
        # Mixed precision following the model's dtype (TRL defaults bf16 on). bf16 autocast
        # also on CPU: faster steps on CPUs with bf16 instructions (the LoRA weights and
        # the optimizer stay float32).
        bf16=dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        # The backend owns gradient checkpointing (Unsloth's offloaded variant, or HF's
        # non-reentrant one); TRL would otherwise switch on its own by default.
        gradient_checkpointing=False,
        # TRL refuses max_length for padding-free rows without packing (it would not enforce
        # it); build_train_dataset already fits every record into model.max_seq_length.
        max_length=None if padding_free and not t.packing else cfg.model.max_seq_length,
        packing=t.packing,
        packing_strategy=t.packing_strategy,
        train_sampling_strategy="group_by_length" if t.group_by_length and not t.packing else "random",
        padding_free=padding_free,
        pad_to_multiple_of=None if padding_free else t.pad_to_multiple_of,
        completion_only_loss=True if t.loss_on == "completion" else None,
        dataset_text_field="text",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=checkpoint_every(cfg),
        # Ray Train keeps run.checkpoints_to_keep in storage; one local copy is enough.
        save_total_limit=1,
        eval_strategy="no",  # validation is label-token scoring, done by RayReportCallback
        report_to=[],
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0 if not cuda else min(4, max(0, int(cfg.run.cpus_per_worker) - 1)),
        dataloader_pin_memory=cuda,
        # Every LoRA parameter takes part in each forward; Ray Train wraps even one worker in DDP.
        ddp_find_unused_parameters=False,
    )


# ---------------------------------------------------------------------------- evaluation


# ---------------------------------------------------------------------------- checkpoints


def restore_checkpoint(checkpoint, output_dir: str) -> tuple[str, dict]:
    """Download a Ray checkpoint (an HF Trainer checkpoint folder) into the trainer's
    output dir as `checkpoint-<step>`; return (its path, the run state saved with it)."""
    # Downloaded beside its final name, which the step inside it decides: the HF Trainer
    # never sees a half-downloaded checkpoint-<step>.
    with local_atomic_dir(os.path.join(output_dir, "restoring")) as stage:
        checkpoint.to_directory(str(stage.path))
        trainer_state = stage.path / "trainer_state.json"
        if not trainer_state.is_file():
            raise CheckpointError(f"checkpoint {checkpoint.path} has no trainer_state.json: not an HF Trainer checkpoint")
        step = int(json.loads(trainer_state.read_text(encoding="utf-8"))["global_step"])
        stage.target = stage.target.with_name(f"checkpoint-{step}")
    target = str(stage.target)
    state = {}
    state_file = os.path.join(target, layout.RUN_STATE_FILE)
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    state["global_step"] = step
    log.info("resuming from checkpoint %s (step %d)", checkpoint.path, step)
    return target, state


def _make_report_callback_class():
    from transformers import TrainerCallback

    class _RayReportCallback(TrainerCallback):
        """Reports to Ray Train at each checkpoint (with the checkpoint; only rank 0
        uploads it) and at each evaluation step; evaluates the validation split by
        label-token scoring on rank 0 at train.eval_steps and at the last step; keeps the
        best evaluation's LoRA weights (train.keep_best) and stops after
        train.early_stopping_patience evaluations without a better macro-F1 (rank 0 decides,
        every rank stops at the same step)."""

        def __init__(self, cfg, *, scorer, validation, is_rank_zero, run_state, fail_at_step=None):
            self.cfg = cfg
            self.scorer = scorer
            self.validation = validation
            self.is_rank_zero = is_rank_zero
            self.run_state = run_state
            self.fail_at_step = fail_at_step
            self.last_eval = None
            self.last_scores = None
            self.last_eval_step = -1
            self.eval_seconds = 0.0  # spent scoring inside trainer.train(), kept out of tokens/s
            self.best_macro_f1 = None
            self.best_step = None
            self.best_state = None  # the best evaluation's trainable (LoRA) weights, on the CPU
            self.evals_without_improvement = 0
            self.stopped_early_at = None

        def _eval_due(self, state) -> bool:
            every = self.cfg.train.eval_steps
            return state.global_step >= state.max_steps or bool(every and state.global_step % every == 0)

        def _track_best(self, state, model) -> None:
            f1 = self.last_eval["macro_f1"]
            if self.best_macro_f1 is None or f1 > self.best_macro_f1:
                self.best_macro_f1, self.best_step = f1, state.global_step
                self.evals_without_improvement = 0
                if self.cfg.train.keep_best and model is not None:
                    self.best_state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
            else:
                self.evals_without_improvement += 1

        def restore_best(self, model) -> bool:
            """Put the best evaluation's LoRA weights back; whether anything changed."""
            if not self.best_state or self.best_step == self.last_eval_step:
                return False
            import torch

            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in self.best_state:
                        param.copy_(self.best_state[name].to(param.device))
            return True

        def _should_stop(self, state) -> bool:
            patience = self.cfg.train.early_stopping_patience
            if not patience:
                return False
            stop = self.scorer is not None and self.evals_without_improvement >= patience
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                import torch

                flag = torch.tensor(
                    [1 if stop else 0], device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
                )
                dist.broadcast(flag, src=0)
                stop = bool(flag.item())
            return stop

        def _metrics(self, state) -> dict:
            """The report of this step: step, epoch, the last logged loss, and the validation
            metrics when this step was evaluated."""
            metrics = {"step": state.global_step, "epoch": state.epoch}
            for entry in reversed(state.log_history):
                if "loss" in entry:
                    metrics["train_loss"] = entry["loss"]
                    metrics["learning_rate"] = entry.get("learning_rate")
                    break
            if self.last_eval_step == state.global_step:
                metrics.update(flat_validation_metrics(self.last_eval))
            return metrics

        def _evaluate(self, state, model) -> None:
            eval_started = time.time()
            self.last_eval, self.last_scores = evaluate_split(self.scorer, self.validation)
            self.eval_seconds += time.time() - eval_started
            self.last_eval_step = state.global_step
            self._track_best(state, model)

        def on_step_end(self, args, state, control, **kwargs):
            if self.fail_at_step is not None and state.global_step == self.fail_at_step:
                raise RuntimeError(
                    f"{FAIL_AT_STEP_ENV}={self.fail_at_step}: test-injected failure after step {state.global_step}"
                )
            if not self._eval_due(state):
                return control
            if self.scorer is not None:
                self._evaluate(state, kwargs.get("model"))
            if state.global_step < state.max_steps and self._should_stop(state):
                self.stopped_early_at = state.global_step
                control.should_training_stop = True
                control.should_save = True  # a checkpoint where it stopped
            # Evaluation-only report, unless the checkpoint at this step reports it (on_save).
            if not control.should_save:
                import ray.train

                ray.train.report(self._metrics(state))
            return control

        def on_save(self, args, state, control, **kwargs):
            import ray.train

            checkpoint = None
            if self.is_rank_zero:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                with open(os.path.join(folder, layout.RUN_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(self.run_state, f)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                self._metrics(state), checkpoint=checkpoint, checkpoint_dir_name=layout.checkpoint_dir_name(state.global_step)
            )
            return control

    return _RayReportCallback


def fused_loss_available(device) -> bool:
    """TRL 1.15's SFTTrainer computes the loss with a Triton kernel (a fused LM head); the
    CPU torch build has no Triton, and Triton kernels do not run on CPU tensors anyway."""
    return compat.trl_fused_loss_kernel() is not None and device.type in ("cuda", "xpu")


def keep_label_position_logits(inputs: dict) -> dict:
    """Ask the model for logits only where a label token is predicted.

    With loss on the completion, a prompt-completion row has a handful of label positions
    among ~100 tokens; the LM head over the rest (576 x 49k multiply-adds per token for the
    demo model, and a log-softmax over 49k classes) is, by FLOP count, about a sixth of a
    CPU step, wasted. The
    model's own causal-LM loss takes pre-shifted labels (`shift_labels`), so the objective
    is unchanged: the same token NLL summed over label positions / num_items_in_batch
    (tests/integration/test_train.py compares both). Positions are shared across the batch dimension
    (padding-free batches have one row; padded ones keep the union of their rows')."""
    import torch

    labels = inputs.get("labels")
    if labels is None or labels.dim() != 2:
        return inputs
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    positions = (shifted != -100).any(dim=0).nonzero().squeeze(1)
    if positions.numel() == 0 or positions.numel() == labels.shape[1]:
        return inputs
    kept = shifted[:, positions].contiguous()
    return {**inputs, "labels": kept, "shift_labels": kept, "logits_to_keep": positions}


def _make_sft_trainer_class():
    import transformers
    from trl import SFTTrainer

    class _PortableSFTTrainer(SFTTrainer):
        """SFTTrainer that falls back to the model's own loss where TRL's fused kernel
        cannot run (CPU). Same objective: the summed token NLL over the label positions
        (completion tokens, or all tokens for full-text records) divided by the batch's
        label-token count, which transformers' causal-LM loss computes when given
        `num_items_in_batch`. TRL's entropy / token-accuracy logs are skipped there."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if fused_loss_available(self.args.device):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            if not return_outputs:
                inputs = keep_label_position_logits(inputs)
            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return _PortableSFTTrainer


class LoraDtypeError(RuntimeError):
    """The weights the first optimizer step would update are not all float32."""


def _make_float32_check_class():
    from transformers import TrainerCallback

    class _Float32LoraCheck(TrainerCallback):
        """Checks, as the first optimizer step of an attempt begins, that every parameter the
        optimizer updates is float32: what it sees is what trains, whatever cast the
        trainer's construction, a restored checkpoint or accelerate's preparation did."""

        def __init__(self):
            self.checked = False

        def on_step_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            if self.checked:
                return control
            self.checked = True
            if optimizer is not None:
                updated = (p for group in optimizer.param_groups for p in group["params"])
            else:
                updated = model.parameters()
            dtypes = trainable_dtypes(updated)
            if set(dtypes) != {"float32"}:
                raise LoraDtypeError(
                    f"the optimizer would update LoRA weights of dtypes {dtypes} (elements per dtype); "
                    "they must all be float32, or small updates round away"
                )
            return control

    return _Float32LoraCheck


def build_sft_trainer(model, args, train_dataset, tokenizer, callbacks=(), trainer_class=None):
    """The project's SFTTrainer (`trainer_class`, default sft_trainer_class()) over `model`,
    with its LoRA weights float32 when training starts, and checked at the first step.

    TRL 1.15's SFTTrainer.__init__ casts every trainable parameter of a quantised model
    (`model.is_loaded_in_4bit` / `is_loaded_in_8bit`) to bfloat16, unconditionally (not
    only with `bf16=True`), following the QLoRA paper (trl/trainer/sft_trainer.py, "When
    using QLoRA, the PEFT adapter weights are converted to bf16"). TRL has no option to
    skip it, and hiding the quantisation flag would change what peft and accelerate do
    with the model too, so the weights are cast back here, after the constructor and
    before `train()` builds the optimizer (which then holds float32 weights, and restores a
    checkpoint's optimizer state in float32). A cast is a no-op where nothing changed them.
    The check callback fails the run if anything later (another library version, a
    backend's patch) hands the first optimizer step something else."""
    trainer_class = trainer_class or sft_trainer_class()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[_make_float32_check_class()(), *callbacks],
    )
    cast = train_lora_in_float32(trainer.model)
    if cast:
        log.info("%d trainable parameters were cast back to float32 after the trainer was built", cast)
    return trainer


_SFT_TRAINER_CLASS = None
_REPORT_CALLBACK_CLASS = None


def sft_trainer_class():
    """The SFTTrainer subclass (built on first use, like report_callback_class)."""
    global _SFT_TRAINER_CLASS
    if _SFT_TRAINER_CLASS is None:
        _SFT_TRAINER_CLASS = _make_sft_trainer_class()
    return _SFT_TRAINER_CLASS


def report_callback_class():
    """The TrainerCallback class (built on first use: transformers must not be imported
    when this module is, since Unsloth has to be imported first in a worker)."""
    global _REPORT_CALLBACK_CLASS
    if _REPORT_CALLBACK_CLASS is None:
        _REPORT_CALLBACK_CLASS = _make_report_callback_class()
    return _REPORT_CALLBACK_CLASS
