"""Training speed and memory: the project's unsloth backend against its hf backend.

    python jobs/benchmark.py train --model llama8b-shape --out $OUT          # GPU: unsloth, then hf
    python jobs/benchmark.py train --model <tiny dir> --smoke --out /tmp/b   # CPU smoke (hf only)

The parent (`run_train_benchmark`) prepares the model once (a random-weight shape is built in
a child process of its own), then runs one child process per (backend, loop), one after the
other, so Unsloth's patches never reach the hf run and each run starts with an empty GPU:

    python -m sentiment_ray.bench.train_bench --spec <spec.json> --result <result.json>

Each child trains exactly as the training job's worker does (sentiment_ray.train.data /
trainer:
`build_train_dataset`, `build_sft_config`, `build_sft_trainer` - TRL SFTTrainer, packing,
the global batch from the config cut into micro-batches as the job cuts it (`plan_batches`),
adamw_8bit, linear LR, bf16, the backend's gradient checkpointing), with checkpoint saving
switched off, for `warmup + steps` optimizer steps.
A `TrainerCallback` synchronises CUDA at the end of every optimizer step and takes the
time since the previous step's end (so a step's time includes data loading, the optimizer
and logging); the trainer subclass counts each micro-batch's real tokens (attention-mask
ones, or every position of a padding-free packed row) and causal attention pairs on the
device, without a host sync. The first `warmup` steps (Unsloth compiles there) are
excluded from every rate; their times are still reported.

`loop=bare` swaps the Trainer loop for a plain one over the same dataloader and optimizer
(forward, backward, optimizer step; no LR schedule, clipping or logging), to show what the
Trainer machinery costs. Its loss is the model's own (mean over each micro-batch's label
tokens), not TRL's (summed over the step's label tokens), so compare its losses only with
other bare runs.

Memory: `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the training call
(peak stats reset after the model and trainer are built; the weights are resident, so
they are in the peak). FLOPs and MFU: see `sentiment_ray.bench.flops`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sentiment_ray import backends
from sentiment_ray.backends.base import gradient_checkpointing_for
from sentiment_ray.bench import common, flops
from sentiment_ray.config import validate
from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate
from sentiment_ray.train import data as train_data
from sentiment_ray.train import trainer as sft

RESULT_FILE = "train_benchmark.json"
DEFAULT_WARMUP = 3
DEFAULT_STEPS = 8
# Targets for the 8B shape on one H100-class GPU, checked when the model is llama8b-shape.
TARGETS = {"unsloth_tokens_per_s": 7300.0, "speedup_vs_hf": 3.0, "memory_ratio_vs_hf": 0.45}
SMOKE_OVERRIDES = [
    "model.max_seq_length=256",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=2",
]
LOSS_AGREEMENT_REL = 0.02  # |unsloth - hf| / hf at the last step; above this the table flags it


# ============================================================================ parent


def child_config(base_cfg, model_path: str, backend: str, warmup: int, steps: int, data_path: str) -> dict[str, Any]:
    """The config a child trains with: the preset's model/LoRA/train settings, this model
    and backend, `warmup + steps` steps, a loss log every step, no evaluation or saving."""
    cfg = base_cfg.model_copy(deep=True)
    cfg.model.name = model_path
    cfg.model.backend = backend
    cfg.data.train_path = data_path
    cfg.data.validation_path = ""
    cfg.train.max_steps = warmup + steps
    cfg.train.logging_steps = 1
    cfg.train.eval_steps = 0
    cfg.train.save_steps = 0
    cfg.train.zero_shot_eval = False
    cfg.run.name = "bench"
    return cfg.model_dump(mode="json")


def run_train_benchmark(
    *,
    model: str,
    out_dir: str,
    backends: list[str] | None = None,
    loops: list[str] | None = None,
    config: str = common.DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    data: str | None = None,
    warmup: int = DEFAULT_WARMUP,
    steps: int = DEFAULT_STEPS,
    max_rows: int = 0,
    peak_tflops: float = flops.H100_SXM_BF16_DENSE_TFLOPS,
    tokenizer: str = "smollm2-135m-instruct",
    cache_dir: str | None = None,
    child_timeout: float = 480.0,
    smoke: bool = False,
    echo=print,
) -> dict[str, Any]:
    """Run the benchmark; write `<out_dir>/train_benchmark.json` (+ one JSON and one log per
    child); print a table; return the combined result."""
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    backends = backends or common.default_backends(smoke)
    loops = loops or ["trainer"]
    overrides = list(SMOKE_OVERRIDES if smoke else []) + list(overrides or [])
    base_cfg = common.base_config(config, overrides)
    data_path = common.resolve_data_path(data)
    echo(f"[bench] model {model}: preparing")
    prepared = common.prepare_model(model, tokenizer, cache_dir, out, child_timeout)
    echo(f"[bench] model ready at {prepared['path']} ({prepared['seconds']} s); data {data_path}")

    runs: dict[str, dict[str, Any]] = {}
    for loop in loops:
        for backend in backends:
            key = backend if loop == "trainer" else f"{backend}-{loop}"
            spec = {
                "config": child_config(base_cfg, prepared["path"], backend, warmup, steps, data_path),
                "model_label": model,
                "warmup_steps": warmup,
                "timed_steps": steps,
                "loop": loop,
                "max_rows": max_rows,
                "peak_tflops": peak_tflops,
            }
            echo(f"[bench] {key}: training {warmup} warm-up + {steps} timed steps in a child process")
            result = common.run_measurement(
                "sentiment_ray.bench.train_bench",
                spec,
                out / f"spec-{key}.json",
                out / f"train-{key}.json",
                out / f"train-{key}.log",
                child_timeout,
                backend,
                key,
                echo,
            )
            if "error" not in result:
                echo(f"[bench] {key}: {common.fmt(result.get('tokens_per_s'), '.0f')} tokens/s ({result['child']['seconds']} s)")
            runs[key] = result

    combined = {
        "mode": "train",
        "model": model,
        "model_path": prepared["path"],
        "model_prepare": prepared,
        "data": data_path,
        "config_preset": config,
        "overrides": overrides,
        "smoke": smoke,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "peak_tflops": peak_tflops,
        "flops_convention": flops.TRAIN_CONVENTION,
        "runs": runs,
        "comparisons": compare_runs(runs, loops),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    if model == "llama8b-shape":
        combined["targets"] = check_targets(runs.get("unsloth"), runs.get("hf"))
    common.write_json(out / RESULT_FILE, combined)
    echo(format_train_table(combined))
    echo(f"[bench] full results: {out / RESULT_FILE}")
    return combined


def _ok(run: dict[str, Any] | None) -> bool:
    return bool(run) and "error" not in run


def compare_runs(runs: dict[str, dict[str, Any]], loops: list[str]) -> dict[str, Any]:
    """unsloth / hf ratios and loss agreement, per loop, where both ran."""
    out: dict[str, Any] = {}
    for loop in loops:
        suffix = "" if loop == "trainer" else f"-{loop}"
        u, h = runs.get("unsloth" + suffix), runs.get("hf" + suffix)
        if not (_ok(u) and _ok(h)):
            continue
        ratios = {
            "tokens_per_s": common.ratio(u["tokens_per_s"], h["tokens_per_s"]),
            "step_time_s": common.ratio(u["step_time_s"]["mean"], h["step_time_s"]["mean"]),
            "peak_memory_allocated": common.ratio(u["peak_memory_allocated_gib"], h["peak_memory_allocated_gib"]),
            "peak_memory_reserved": common.ratio(u["peak_memory_reserved_gib"], h["peak_memory_reserved_gib"]),
            "mfu": common.ratio(u.get("mfu"), h.get("mfu")),
        }
        out[f"unsloth/hf{suffix}"] = {"ratios": ratios, "loss_agreement": loss_agreement(u["losses"], h["losses"])}
    return out


def loss_agreement(a: list[float | None], b: list[float | None]) -> dict[str, Any]:
    pairs = [(x, y) for x, y in zip(a, b) if common.finite(x) and common.finite(y)]
    if not pairs:
        return {"last_abs_diff": None, "last_rel_diff": None, "max_rel_diff": None, "agree": None}
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in pairs]
    last_x, last_y = pairs[-1]
    return {
        "first": [pairs[0][0], pairs[0][1]],
        "last": [last_x, last_y],
        "last_abs_diff": abs(last_x - last_y),
        "last_rel_diff": rel[-1],
        "max_rel_diff": max(rel),
        "agree": rel[-1] <= LOSS_AGREEMENT_REL,
        "tolerance_rel": LOSS_AGREEMENT_REL,
    }


def check_targets(u: dict | None, h: dict | None) -> dict[str, Any]:
    tps = u.get("tokens_per_s") if _ok(u) else None
    speed = common.ratio(tps, h.get("tokens_per_s")) if _ok(u) and _ok(h) else None
    mem = common.ratio(u.get("peak_memory_allocated_gib"), h.get("peak_memory_allocated_gib")) if _ok(u) and _ok(h) else None
    return {
        "unsloth_tokens_per_s": {
            "value": tps,
            "target": f">= {TARGETS['unsloth_tokens_per_s']:.0f}",
            "pass": None if tps is None else tps >= TARGETS["unsloth_tokens_per_s"],
        },
        "speedup_vs_hf": {
            "value": speed,
            "target": f">= {TARGETS['speedup_vs_hf']}",
            "pass": None if speed is None else speed >= TARGETS["speedup_vs_hf"],
        },
        "memory_ratio_vs_hf": {
            "value": mem,
            "target": f"<= {TARGETS['memory_ratio_vs_hf']}",
            "pass": None if mem is None else mem <= TARGETS["memory_ratio_vs_hf"],
        },
    }


def format_train_table(result: dict[str, Any]) -> str:
    f = common.fmt
    header = ["run", "tok/s", "step s", "alloc GiB", "resv GiB", "MFU", "loss first", "loss last", "warm-up s"]
    rows = []
    for key, r in result["runs"].items():
        if not _ok(r):
            rows.append([key, "FAILED", "-", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                key,
                f(r["tokens_per_s"], ".0f"),
                f(r["step_time_s"]["mean"], ".3f"),
                f(r["peak_memory_allocated_gib"], ".2f"),
                f(r["peak_memory_reserved_gib"], ".2f"),
                f(r.get("mfu"), ".3f"),
                f(r["losses"][0] if r["losses"] else None, ".4f"),
                f(r["loss_last"], ".4f"),
                f(r["warmup_time_s"], ".1f"),
            ]
        )
    cfg = next((r.get("setup") for r in result["runs"].values() if _ok(r)), None) or {}
    lines = [
        f"== train benchmark: {result['model']} | {result['warmup_steps']} warm-up + {result['timed_steps']} timed optimizer steps"
        + (
            f" | batch {cfg.get('per_device_train_batch_size')} x GA {cfg.get('gradient_accumulation_steps')} x {cfg.get('max_length')} tokens, packing={cfg.get('packing')}"
            if cfg
            else ""
        )
        + f" | MFU vs {result['peak_tflops']:g} TFLOP/s",
        common.format_table(header, rows),
    ]
    for name, comp in result["comparisons"].items():
        r, la = comp["ratios"], comp["loss_agreement"]
        lines.append(
            f"{name}: tokens/s x{f(r['tokens_per_s'], '.2f')}  step time x{f(r['step_time_s'], '.2f')}  "
            f"peak alloc x{f(r['peak_memory_allocated'], '.2f')}  peak reserved x{f(r['peak_memory_reserved'], '.2f')}  "
            f"MFU x{f(r['mfu'], '.2f')}  | last loss diff {f(la['last_abs_diff'], '.4f')} "
            f"({f(None if la['last_rel_diff'] is None else 100 * la['last_rel_diff'], '.2f')}%, "
            f"{'agree' if la['agree'] else 'DISAGREE' if la['agree'] is not None else '-'})"
        )
    if "targets" in result:
        parts = []
        for name, t in result["targets"].items():
            verdict = "-" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            parts.append(f"{name} {f(t['value'], '.2f')} ({t['target']}) {verdict}")
        lines.append("targets: " + "; ".join(parts))
    return "\n".join(lines)


# ============================================================================ child


def _token_counter_class():
    import torch

    class TokenCounter:
        """Per optimizer step: real tokens, label tokens, positions fed, causal attention
        pairs. Accumulated as device tensors (no host sync); read after a synchronize."""

        def __init__(self):
            self.reset()

        def reset(self):
            self._acc = None
            self.micro_batches = 0

        def count(self, inputs: dict[str, Any]) -> None:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            pos = inputs.get("position_ids")
            if mask is not None:
                real = mask.to(torch.int64)
                if pos is None:
                    pos = (real.cumsum(dim=-1) - 1).clamp(min=0)
            else:
                real = torch.ones_like(ids, dtype=torch.int64)
                if pos is None:
                    pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
            tokens = real.sum()
            # Sum over real tokens of (position in its document + 1) = sum of n(n+1)/2 per document.
            pairs = ((pos.to(torch.int64) + 1) * real).sum()
            labels = inputs.get("labels")
            label_tokens = (
                (labels[..., 1:] != -100).sum() if labels is not None else torch.zeros((), dtype=torch.int64, device=ids.device)
            )
            positions = torch.tensor(ids.numel(), device=ids.device)
            row = torch.stack([tokens, pairs, label_tokens.to(torch.int64), positions])
            self._acc = row if self._acc is None else self._acc + row
            self.micro_batches += 1

        def pop(self) -> dict[str, int]:
            if self._acc is None:
                values = [0, 0, 0, 0]
            else:
                values = [int(v) for v in self._acc.tolist()]
            micro = self.micro_batches
            self.reset()
            return {
                "tokens": values[0],
                "pairs": values[1],
                "label_tokens": values[2],
                "positions": values[3],
                "micro_batches": micro,
            }

    return TokenCounter


def _sync_fn(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timer_callback_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Times each optimizer step (end to end, CUDA synchronised) and takes its token counts."""

        def __init__(self, counter, sync):
            self.counter, self.sync = counter, sync
            self.steps: list[dict[str, Any]] = []
            self._last = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.sync()
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.sync()
            now = time.perf_counter()
            entry = {"step": state.global_step, "seconds": now - self._last, **self.counter.pop()}
            self.steps.append(entry)
            self._last = now

    return StepTimer


FINGERPRINTED_BATCHES = 3  # the first micro-batches, hashed: both backends must see the same ones


def _bench_trainer_class(base, counter):
    class BenchSFTTrainer(base):
        """The training job's SFTTrainer, counting each micro-batch's tokens and hashing the
        first few (input ids and label mask) so two runs can show they trained on the same."""

        def training_step(self, model, inputs, *args, **kwargs):
            counter.count(inputs)
            fingerprints = self.__dict__.setdefault("batch_fingerprints", [])
            if len(fingerprints) < FINGERPRINTED_BATCHES:
                fingerprints.append(_batch_fingerprint(inputs))
            return super().training_step(model, inputs, *args, **kwargs)

    return BenchSFTTrainer


def _batch_fingerprint(inputs: dict[str, Any]) -> str:
    """A hash of the micro-batch's real tokens and label tokens, in order: the same rows give
    the same hash whether they come padded or padding-free."""
    import hashlib

    ids, labels, mask = inputs["input_ids"], inputs.get("labels"), inputs.get("attention_mask")
    real = ids[mask.bool()] if mask is not None else ids.reshape(-1)
    digest = hashlib.sha1(real.detach().to("cpu").numpy().tobytes())
    if labels is not None:
        digest.update(labels[labels != -100].detach().to("cpu").numpy().tobytes())
    return digest.hexdigest()[:12]


def _numerics(model, tokenizer) -> dict[str, Any]:
    """What can make two backends compute differently: the dtypes of the trained and of
    the frozen floating-point weights, and the tokenizer's padding side."""
    from collections import Counter

    trained, frozen = Counter(), Counter()
    for param in model.parameters():
        if param.dtype.is_floating_point:
            (trained if param.requires_grad else frozen)[str(param.dtype).removeprefix("torch.")] += param.numel()
    return {"trained_dtypes": dict(trained), "frozen_dtypes": dict(frozen), "padding_side": tokenizer.padding_side}


def _estimate_rows(cfg, tokenizer, template, table, total_steps: int) -> int:
    """Rows enough to fill `total_steps` optimizer steps of packed sequences (+15 %), from the
    mean record length of a sample; the trainer starts another epoch if they run out."""
    sample = table.slice(0, min(256, table.num_rows))
    texts = [
        template.full_text(s, l, tokenizer.eos_token)
        for s, l in zip(sample.column("sentence").to_pylist(), sample.column("label").to_pylist())
    ]
    mean_len = max(1.0, sum(len(x) for x in tokenizer(texts)["input_ids"]) / max(1, len(texts)))
    t = cfg.train
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    tokens = total_steps * per_step * (cfg.model.max_seq_length if t.packing else mean_len)
    return max(per_step * total_steps, int(math.ceil(tokens / mean_len * 1.15)) + 16)


def _losses_by_step(log_history: list[dict], total_steps: int, key: str = "loss") -> list[float | None]:
    """`key` (loss, grad_norm, learning_rate) of each optimizer step from the trainer's log."""
    values: list[float | None] = [None] * total_steps
    for entry in log_history:
        if key in entry and "step" in entry and 1 <= entry["step"] <= total_steps:
            values[entry["step"] - 1] = float(entry[key])
    return values


def _bare_loop(trainer, model, counter, sync, device, total_steps: int, grad_accum: int) -> tuple[list[dict], list[float]]:
    """Forward/backward/optimizer over the trainer's own dataloader and optimizer."""
    import contextlib

    import torch

    loader = trainer.get_train_dataloader()
    optimizer = trainer.create_optimizer()

    def batches():
        while True:
            yield from loader

    it = batches()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and trainer.args.bf16 else contextlib.nullcontext()
    )
    model.train()
    steps, losses = [], []
    sync()
    last = time.perf_counter()
    for step in range(1, total_steps + 1):
        step_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            batch = next(it)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
            counter.count(inputs)
            with autocast:
                out = model(**inputs, use_cache=False)
            (out.loss / grad_accum).backward()
            step_loss += out.loss.detach() / grad_accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        now = time.perf_counter()
        steps.append({"step": step, "seconds": now - last, **counter.pop()})
        losses.append(float(step_loss))
        last = time.perf_counter()  # the loss read above is not part of the next step
    return steps, losses


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Train per `spec` in this process and return the measurements (the child's work)."""
    cfg_dict = spec["config"]
    backend_name = backends.resolve_backend_name(cfg_dict["model"]["backend"])
    backends.early_import(backend_name)  # before transformers / trl / peft

    import torch

    started = time.perf_counter()
    cfg = validate(cfg_dict, source="train benchmark spec")
    warmup, timed = int(spec["warmup_steps"]), int(spec["timed_steps"])
    total_steps = warmup + timed
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sync = _sync_fn(device)
    template, labels = PromptTemplate.from_config(cfg.prompt), LabelSet(cfg.prompt.labels)

    t0 = time.perf_counter()
    model, tokenizer = backends.get_backend(backend_name).load_for_training(cfg, device)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = common.load_table(cfg.data.train_path, None, cfg.data.split_seed, cfg.data, labels)
    rows = int(spec.get("max_rows") or 0) or _estimate_rows(cfg, tokenizer, template, table, total_steps)
    table = train_data.stratified_subsample(table, rows, cfg.data.split_seed)
    dataset = train_data.build_train_dataset(cfg, table, tokenizer, template, labels)
    scratch = tempfile.mkdtemp(prefix="sentiment-ray-bench-")
    batches = sft.plan_batches(cfg, model, device, backend_name)
    args = sft.build_sft_config(cfg, device, scratch, world_size=1, batches=batches)
    from transformers.trainer_utils import SaveStrategy

    args.save_strategy = SaveStrategy.NO  # a benchmark keeps no checkpoints
    counter = _token_counter_class()()
    timer = _timer_callback_class()(counter, sync)
    trainer_cls = _bench_trainer_class(sft.sft_trainer_class(), counter)
    hf_trainer = sft.build_sft_trainer(model, args, dataset, tokenizer, callbacks=[timer], trainer_class=trainer_cls)
    prep_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    grad_norms = learning_rates = None
    if spec.get("loop", "trainer") == "bare":
        steps, losses = _bare_loop(hf_trainer, model, counter, sync, device, total_steps, batches.gradient_accumulation_steps)
    else:
        hf_trainer.train()
        steps = timer.steps
        log = hf_trainer.state.log_history
        losses = _losses_by_step(log, total_steps)
        grad_norms = _losses_by_step(log, total_steps, "grad_norm")
        learning_rates = _losses_by_step(log, total_steps, "learning_rate")
    train_s = time.perf_counter() - t0
    if len(steps) != total_steps:
        raise RuntimeError(f"expected {total_steps} optimizer steps, timed {len(steps)}")

    timed_steps = steps[warmup:]
    seconds = sum(s["seconds"] for s in timed_steps)
    tokens = sum(s["tokens"] for s in timed_steps)
    pairs = sum(s["pairs"] for s in timed_steps)
    n_params = _param_counts(model)
    shape = flops.ModelShape.from_config(_text_config(model))
    fl = flops.train_flops(shape, tokens, pairs, n_params["trainable"])
    peak = float(spec.get("peak_tflops") or flops.H100_SXM_BF16_DENSE_TFLOPS)
    finite_losses = [x for x in losses if x is not None]
    result = {
        "backend": backend_name,
        "loop": spec.get("loop", "trainer"),
        "model": spec.get("model_label"),
        "model_path": cfg.model.name,
        "environment": common.environment(device),
        "setup": {
            "max_length": cfg.model.max_seq_length,
            "per_device_train_batch_size": batches.micro_batch_size,
            "gradient_accumulation_steps": batches.gradient_accumulation_steps,
            "micro_batch_chosen_by": batches.chosen_by,
            "packing": cfg.train.packing,
            "loss_on": cfg.train.loss_on,
            "optim": args.optim if isinstance(args.optim, str) else getattr(args.optim, "value", str(args.optim)),
            "learning_rate": cfg.train.learning_rate,
            "lr_scheduler_type": cfg.train.lr_scheduler_type,
            "bf16": bool(args.bf16),
            "load_in_4bit": cfg.model.load_in_4bit and device.type == "cuda",
            "attn_implementation": cfg.model.attn_implementation,
            "lora_r": cfg.lora.r,
            "lora_alpha": cfg.lora.alpha,
            "lora_targets": cfg.lora.target_modules,
            "gradient_checkpointing": gradient_checkpointing_for(cfg, device),
            "seed": cfg.train.seed,
            "train_rows": table.num_rows,
            "packed_sequences": _length(hf_trainer.train_dataset),
        },
        "warmup_steps": warmup,
        "timed_steps": timed,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "step_time_s": common.summary_stats([s["seconds"] for s in timed_steps]),
        "real_tokens_timed": tokens,
        "positions_timed": sum(s["positions"] for s in timed_steps),
        "label_tokens_timed": sum(s["label_tokens"] for s in timed_steps),
        "timed_seconds": seconds,
        "warmup_time_s": sum(s["seconds"] for s in steps[:warmup]),
        "steps": steps,
        "losses": losses,
        "grad_norms": grad_norms,
        "learning_rates": learning_rates,
        "batch_fingerprints": hf_trainer.__dict__.get("batch_fingerprints", []),
        "numerics": _numerics(model, tokenizer),
        "loss_last": finite_losses[-1] if finite_losses else None,
        "loss_finite": bool(finite_losses) and all(math.isfinite(x) for x in finite_losses),
        "peak_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "parameters": n_params,
        "shape": shape.to_dict(),
        "flops": {
            "convention": flops.TRAIN_CONVENTION,
            "matmul_params": shape.matmul_params(),
            "lora_params": n_params["trainable"],
            "model_flops_per_token_dense": 4.0 * shape.matmul_params() + 6.0 * n_params["trainable"],
            "causal_pairs_timed": pairs,
            **{k: v for k, v in fl.items() if k != "tokens"},
        },
        "achieved_tflops": fl["model_flops"] / seconds / 1e12 if seconds > 0 else None,
        "peak_tflops": peak,
        "mfu": flops.mfu(fl["model_flops"], seconds, peak),
        "hfu": flops.mfu(fl["hardware_flops"], seconds, peak),
        "load_time_s": load_s,
        "dataset_prep_s": prep_s,
        "train_call_s": train_s,
        "child_wall_time_s": time.perf_counter() - started,
    }
    return result


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def _param_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())  # 4-bit weights count as packed storage
    return {"trainable": int(trainable), "total_stored": int(total)}


def child_main(argv: list[str] | None = None) -> int:
    code, result = common.child_main(measure, "One training benchmark run (a child of jobs/benchmark.py train).", argv)
    if code == 0:
        print(
            f"[child] {result['backend']}/{result['loop']}: {result['tokens_per_s']:.1f} tokens/s, "
            f"step {result['step_time_s']['mean']:.3f} s, loss {result['loss_last']}",
            flush=True,
        )
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(child_main())
