"""Labelling throughput: label-token scoring vs batched generate vs per-row generate.

    python jobs/benchmark.py label --model llama8b-shape --out $OUT       # GPU: unsloth 4-bit
    python jobs/benchmark.py label --model <tiny dir> --smoke --out /tmp/b  # CPU smoke (hf)

The model is loaded the way the labelling job's actors load it - `label.labeler.Labeler`
(backend `load_for_inference`: on the unsloth backend 4-bit + `for_inference`; the adapter
attached when given) - in a child process per backend:

    python -m sentiment_ray.bench.label_bench --spec <spec.json> --result <result.json>

On `n` sentences drawn from the labelled CSV (a stratified, seeded sample) it measures:

1. tokenisation alone: `LabelScorer.encode` (prompt building + batched fast-tokenizer call +
   the over-long-sentence cut), best of 3;
2. scoring, `LabelScorer.score` (one forward per micro-batch, last-position logits), for
   each batch size of the sweep; its time includes the tokenisation, whose share is given;
3. batched generate, `LabelScorer.generate` (left-padded, greedy, `max_new_tokens`), on the
   first `generate_n` sentences, for each batch size;
4. per-row generate, the naive loop (`tokenizer(prompt)`, one `model.generate` per row,
   decode, parse), on the first `per_row_n` sentences; batch size 1 by construction.

Every phase is preceded by one untimed pass on a few batches (CUDA/cuBLAS set-up, Unsloth's
kernels) and bracketed by `torch.cuda.synchronize()`. A failing phase records its error and
the others still run. Rates: examples/s and prompt tokens/s (real tokens, padding
excluded; the padded count is reported beside them). MFU for scoring follows
`sentiment_ray.bench.flops.SCORING_CONVENTION`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from sentiment_ray import backends
from sentiment_ray.backends import adapter_forms
from sentiment_ray.bench import common, flops, shapes
from sentiment_ray.config import validate
from sentiment_ray.label.labeler import WARM_UP_SENTENCES, Labeler
from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate
from sentiment_ray.scoring import LabelScorer, micro_batches

RESULT_FILE = "label_benchmark.json"
SMOKE_OVERRIDES = ["model.max_seq_length=256"]


# ============================================================================ parent


def run_label_benchmark(
    *,
    model: str,
    out_dir: str,
    backends: list[str] | None = None,
    adapter: str | None = None,
    config: str = common.DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    data: str | None = None,
    n: int = 2048,
    batch_sizes: list[int] | None = None,
    token_budgets: list[int] | None = None,
    generate_n: int = 512,
    per_row_n: int = 64,
    max_new_tokens: int | None = None,
    pipeline_rows: int = 0,
    forms: list[str] | None = None,
    max_lengths: list[int] | None = None,
    peak_tflops: float = flops.H100_SXM_BF16_DENSE_TFLOPS,
    tokenizer: str = "smollm2-135m-instruct",
    cache_dir: str | None = None,
    child_timeout: float = 480.0,
    smoke: bool = False,
    echo=print,
) -> dict[str, Any]:
    """Run the label benchmark per backend; write `<out_dir>/label_benchmark.json`; print a table.

    `adapter="random"` attaches a LoRA adapter of the preset's shape with random weights (what
    labelling with a fine-tuned adapter costs, without a training run). `pipeline_rows` > 0
    also runs the whole labelling job (`jobs/label.py`: Ray Data, one actor per GPU, the
    preset's settings) on that many rows of the data (repeated with new IDs when it has fewer)."""
    started = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    backends = backends or common.default_backends(smoke)
    batch_sizes = batch_sizes or [16, 32, 64, 128, 256]
    token_budgets = [8192, 16384, 32768, 65536] if token_budgets is None else token_budgets
    overrides = list(SMOKE_OVERRIDES if smoke else []) + list(overrides or [])
    base_cfg = common.base_config(config, overrides)
    data_path = common.resolve_data_path(data)
    max_new_tokens = max_new_tokens or base_cfg.label.max_new_tokens
    echo(f"[bench] model {model}: preparing")
    prepared = common.prepare_model(model, tokenizer, cache_dir, out, child_timeout)
    echo(f"[bench] model ready at {prepared['path']} ({prepared['seconds']} s); data {data_path}")
    if adapter == "random":
        adapter = shapes.write_random_adapter(prepared["path"], str(out / "random-adapter"), base_cfg.lora, seed=0)
        echo(f"[bench] random LoRA adapter (r={base_cfg.lora.r}, {', '.join(base_cfg.lora.target_modules)}) at {adapter}")

    runs: dict[str, dict[str, Any]] = {}
    for backend in backends:
        cfg = base_cfg.model_copy(deep=True)
        cfg.model.name = prepared["path"]
        cfg.model.backend = backend
        cfg.label.mode = "scoring"
        cfg.label.max_new_tokens = max_new_tokens
        spec = {
            "config": cfg.model_dump(mode="json"),
            "model_label": model,
            "adapter": os.path.abspath(adapter) if adapter else None,
            "data": data_path,
            "n": n,
            "batch_sizes": batch_sizes,
            "token_budgets": token_budgets,
            "max_lengths": max_lengths or [],
            "generate_n": generate_n,
            "per_row_n": per_row_n,
            "max_new_tokens": max_new_tokens,
            "peak_tflops": peak_tflops,
            "forms": forms or [],
        }
        echo(f"[bench] label/{backend}: {n} sentences, batch sizes {batch_sizes}, in a child process")
        result = common.run_measurement(
            "sentiment_ray.bench.label_bench",
            spec,
            out / f"spec-label-{backend}.json",
            out / f"label-{backend}.json",
            out / f"label-{backend}.log",
            child_timeout,
            backend,
            f"label/{backend}",
            echo,
        )
        runs[backend] = result
        if pipeline_rows:
            echo(f"[bench] label/{backend}: the whole labelling job on {pipeline_rows} rows, in a child process")
            result["pipeline"] = run_pipeline(
                cfg, adapter, data_path, pipeline_rows, out / f"pipeline-{backend}", child_timeout, echo
            )

    combined = {
        "mode": "label",
        "model": model,
        "model_path": prepared["path"],
        "model_prepare": prepared,
        "adapter": adapter,
        "data": data_path,
        "config_preset": config,
        "overrides": overrides,
        "smoke": smoke,
        "peak_tflops": peak_tflops,
        "flops_convention": flops.SCORING_CONVENTION,
        "runs": runs,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    common.write_json(out / RESULT_FILE, combined)
    echo(format_forms_table(combined) if forms else format_label_table(combined))
    echo(f"[bench] full results: {out / RESULT_FILE}")
    return combined


def format_forms_table(result: dict[str, Any]) -> str:
    """One row per adapter form and setting: speed, MFU, memory, and agreement with peft's layers."""
    f = common.fmt
    header = [
        "backend",
        "form",
        "budget",
        "prefix",
        "prompt tok/s",
        "computed tok/s",
        "MFU",
        "pad %",
        "peak GiB",
        "x no adapter",
        "same label",
        "max |dp|",
        "set-up s",
    ]
    rows: list[list[str]] = []
    for backend, r in result["runs"].items():
        forms = r.get("forms") or {}
        base = {
            (x["max_batch_tokens"], x["reuse_prefix"]): x["prompt_tokens_per_s"]
            for x in (forms.get("none") or {}).get("runs", [])
        }
        for name, form in forms.items():
            if "error" in form:
                rows.append([backend, name, "FAILED"] + ["-"] * 10)
                continue
            for x in form["runs"]:
                rows.append(
                    [
                        backend,
                        name + ("" if form.get("compiled") or "compiled" not in name else " (fell back)"),
                        str(x["max_batch_tokens"]),
                        "yes" if x["reuse_prefix"] else "no",
                        f(x["prompt_tokens_per_s"], ".0f"),
                        f(x["computed_tokens_per_s"], ".0f"),
                        f(x["mfu"], ".3f"),
                        f(100 * x["padding_fraction"], ".1f"),
                        f(x.get("peak_memory_allocated_gib"), ".2f"),
                        f(common.ratio(x["prompt_tokens_per_s"], base.get((x["max_batch_tokens"], x["reuse_prefix"]))), ".2f"),
                        f(x.get("same_label_share"), ".4f"),
                        f(x.get("max_prob_difference"), ".4f"),
                        f(form.get("set_up_s"), ".1f"),
                    ]
                )
    return common.format_table(header, rows)


def format_label_table(result: dict[str, Any]) -> str:
    f = common.fmt
    header = ["backend", "mode", "batch", "ex/s", "prompt tok/s", "computed tok/s", "MFU", "tokenise %", "pad %", "peak GiB"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for backend, r in result["runs"].items():
        if "error" in r and "scoring" not in r:
            rows.append([backend, "FAILED"] + ["-"] * 8)
            continue
        tok = r.get("tokenisation") or {}
        notes.append(
            f"{backend}: {r.get('n_examples')} sentences, {f(r.get('mean_prompt_tokens'), '.1f')} prompt tokens each; "
            f"tokenisation alone {f(tok.get('examples_per_s'), '.0f')} ex/s; load {f(r.get('load_time_s'), '.1f')} s"
        )
        for mode in ("scoring", "generate_batched"):
            phase = r.get(mode)
            if isinstance(phase, dict) and "error" in phase:
                rows.append([backend, mode, "FAILED"] + ["-"] * 7)
                continue
            for p in phase or []:
                rows.append(
                    [
                        backend,
                        "score" if mode == "scoring" else "generate",
                        str(p["batch_size"]),
                        f(p["examples_per_s"], ".1f"),
                        f(p["prompt_tokens_per_s"], ".0f"),
                        f(p.get("computed_tokens_per_s"), ".0f"),
                        f(p.get("mfu"), ".3f"),
                        f(None if p.get("tokenisation_share") is None else 100 * p["tokenisation_share"], ".1f"),
                        f(None if p.get("padding_fraction") is None else 100 * p["padding_fraction"], ".1f"),
                        f(p.get("peak_memory_allocated_gib"), ".2f"),
                    ]
                )
        pr = r.get("generate_per_row")
        if isinstance(pr, dict) and "examples_per_s" in pr:
            rows.append(
                [
                    backend,
                    "per-row gen",
                    "1",
                    f(pr["examples_per_s"], ".2f"),
                    f(pr["prompt_tokens_per_s"], ".0f"),
                    "-",
                    "-",
                    "-",
                    "0.0",
                    f(pr.get("peak_memory_allocated_gib"), ".2f"),
                ]
            )
        elif isinstance(pr, dict) and "error" in pr:
            rows.append([backend, "per-row gen", "FAILED"] + ["-"] * 7)
        pipe = r.get("pipeline")
        if isinstance(pipe, dict) and "error" not in pipe:
            notes.append(
                f"{backend} whole job (jobs/label.py): {pipe.get('rows')} rows, {f(pipe.get('prompt_tokens_per_s_in_window'), '.0f')} "
                f"prompt tok/s in the labelling window, {f(pipe.get('prompt_tokens_per_s'), '.0f')} over the job "
                f"({f(pipe.get('job_over_window'), '.2f')} of the window), actor start-up {f(pipe.get('actor_startup_s_max'), '.1f')} s"
            )
        elif isinstance(pipe, dict):
            notes.append(f"{backend} whole job: FAILED ({pipe['error']})")
    lines = [
        f"== label benchmark: {result['model']}"
        + (f" + adapter {result['adapter']}" if result.get("adapter") else "")
        + f" | MFU (scoring) vs {result['peak_tflops']:g} TFLOP/s",
        *notes,
        common.format_table(header, rows),
    ]
    return "\n".join(lines)


def run_pipeline(cfg, adapter: str | None, data_path: str, rows: int, out: Path, timeout: float, echo) -> dict[str, Any]:
    """The whole labelling job in a child process (`jobs/label.py`, Ray Data, the config's
    settings) on `rows` rows of the data: its summary's throughput, start-up and counts."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    input_path = out / "input.parquet"
    common.write_rows(data_path, rows, str(input_path))
    job_cfg = cfg.model_copy(deep=True)
    job_cfg.run.use_gpu = "auto"  # the GPUs there are, one actor each
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(job_cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    args = [
        str(common.REPO_ROOT / "jobs" / "label.py"),
        "--config",
        str(config_path),
        "--input",
        str(input_path),
        "--output",
        str(out / "labels"),
        "--overwrite",
    ]
    if adapter:
        args += ["--adapter", os.path.abspath(adapter)]
    run = common.run_script(args, out / "label.log", timeout)
    summary = common.last_json_line(run["log"])
    if run["returncode"] != 0 or summary is None:
        echo(f"[bench] pipeline FAILED (rc {run['returncode']}):\n{common.log_tail(run['log'], 25)}")
        return {"error": f"jobs/label.py exited with {run['returncode']}", "child": run}
    keep = (
        "rows",
        "labelled",
        "prompt_tokens",
        "label_seconds",
        "prompt_tokens_per_s",
        "prompt_tokens_per_s_in_window",
        "rows_per_s_in_window",
        "labelling_window_s",
        "actors_used",
        "actor_startup_s_max",
        "actor_startup_s_mean",
        "units",
    )
    result = {k: summary.get(k) for k in keep}
    result["job_over_window"] = common.ratio(summary.get("prompt_tokens_per_s"), summary.get("prompt_tokens_per_s_in_window"))
    result["child"] = run
    return result


# ============================================================================ child


def padded_tokens(lengths: list[int], batch_size: int, max_batch_tokens: int = 0) -> int:
    """Tokens the model runs, padding included, when LabelScorer batches `lengths`."""
    return sum(len(rows) * max(lengths[r] for r in rows) for rows in micro_batches(lengths, batch_size, max_batch_tokens))


def _phase(fn):
    """Run one phase; a failure becomes {"error": ...} so the other phases still run."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}


class _Clock:
    """The measuring device: synchronise before reading a clock, reset and read the peak
    of allocated GPU memory (None on a CPU)."""

    def __init__(self):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None


FORMS = ("none", "unmerged", "fused", "merged", "merged+compiled")


def measure_forms(spec: dict[str, Any]) -> dict[str, Any]:
    """The adapter's forms side by side on one load of base + adapter: no adapter (peft's
    layers disabled), peft's layers, Unsloth's fused forwards, merged into 16-bit weights,
    and merged under torch.compile; each at every token budget, whole prompts and with the
    shared prefix reused. Every form's labels and probabilities are compared with peft's
    layers (the reference: what training's own evaluation runs)."""
    import contextlib

    import numpy as np

    started = time.perf_counter()
    backend_name = backends.resolve_backend_name(spec["config"]["model"]["backend"])
    backends.early_import(backend_name)
    cfg = validate(spec["config"], source="label benchmark spec")
    clock = _Clock()
    device = clock.device
    backend = backends.get_backend(backend_name)
    t0 = time.perf_counter()
    model, tok = backend.load_for_inference(cfg, spec.get("adapter"), device)
    load_s = time.perf_counter() - t0
    labels = LabelSet(cfg.prompt.labels)
    template = PromptTemplate.from_config(cfg.prompt)
    shape = flops.ModelShape.from_config(getattr(model.config, "text_config", None) or model.config)
    peak = float(spec.get("peak_tflops") or flops.H100_SXM_BF16_DENSE_TFLOPS)
    table = common.load_table(spec["data"], int(spec["n"]), cfg.data.split_seed, cfg.data, labels)
    sentences = table.column("sentence").to_pylist()
    budgets = [int(b) for b in spec.get("token_budgets") or [cfg.label.max_batch_tokens]]
    wanted = [f for f in FORMS if f in (spec.get("forms") or FORMS)]
    has_adapter = hasattr(model, "peft_config")
    lora_params = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)

    def run_form(name: str, compile: bool = False, context=contextlib.nullcontext) -> dict[str, Any]:
        with context():
            t = time.perf_counter()
            scorer = LabelScorer(
                model,
                tok,
                template,
                labels,
                cfg.model.max_seq_length,
                None,
                budgets[0],
                reuse_prefix=True,
                compile=compile,
            )
            shared_prefix = scorer.prefix_ids
            scorer.warm_up(WARM_UP_SENTENCES)
            ids, _ = scorer.encode(sentences)
            lengths = [len(x) for x in ids]
            fl = flops.scoring_flops(shape, lengths, lora_params if name in ("unmerged", "fused") else 0)
            out = {"compiled": scorer.compiled, "set_up_s": round(time.perf_counter() - t, 2), "runs": []}
            for budget in budgets:
                for reuse in [False, True] if shared_prefix else [False]:
                    scorer.max_batch_tokens, scorer.prefix_ids = budget, shared_prefix if reuse else []
                    scorer.score(sentences[: min(len(sentences), 512)])  # this budget's shapes, once
                    clock.reset_peak()
                    clock.sync()
                    t = time.perf_counter()
                    res = scorer.score(sentences)
                    clock.sync()
                    dt = time.perf_counter() - t
                    padded = padded_tokens(lengths if not reuse else [n - len(shared_prefix) for n in lengths], None, budget)
                    out["runs"].append(
                        {
                            "max_batch_tokens": budget,
                            "reuse_prefix": reuse,
                            "seconds": dt,
                            "prompt_tokens_per_s": res.prompt_tokens / dt,
                            "computed_tokens_per_s": res.computed_tokens / dt,
                            "padding_fraction": 1 - (res.computed_tokens - (len(shared_prefix) if reuse else 0)) / padded
                            if padded
                            else 0.0,
                            "mfu": flops.mfu(fl["model_flops"], dt, peak),
                            "peak_memory_allocated_gib": clock.peak_gib(),
                            "probs": res.probs,
                        }
                    )
            out["weights_gib"] = adapter_forms.weights_gib(model)
        return out

    results: dict[str, Any] = {}
    for name in wanted:
        if name == "none":
            results[name] = _phase(
                lambda: run_form(name, context=model.disable_adapter if has_adapter else contextlib.nullcontext)
            )
        elif name == "unmerged" and has_adapter:
            results[name] = _phase(lambda: run_form(name))
        elif name == "fused" and has_adapter and backend.can_fuse(model):
            kept = _unsloth_forwards(model)
            model = backend.apply_adapter_form(model, "fused")
            results[name] = _phase(lambda: run_form(name))
            _restore_forwards(kept)
        elif name == "merged" and has_adapter:
            model = backend.apply_adapter_form(model, "merged")
            results[name] = _phase(lambda: run_form(name))
        elif name == "merged+compiled":
            if has_adapter and hasattr(model, "peft_config"):
                model = backend.apply_adapter_form(model, "merged")
            results[name] = _phase(lambda: run_form(name, compile=True))
    reference = {
        (run["max_batch_tokens"], run["reuse_prefix"]): run["probs"] for run in results.get("unmerged", {}).get("runs", [])
    }
    for form in results.values():
        for run in form.get("runs", []):
            probs = run.pop("probs")
            ref = reference.get((run["max_batch_tokens"], run["reuse_prefix"]))
            if ref is not None:
                run["same_label_share"] = float(np.mean(ref.argmax(1) == probs.argmax(1)))
                run["max_prob_difference"] = float(np.abs(ref - probs).max())
    return {
        "backend": backend_name,
        "model": spec.get("model_label"),
        "adapter": spec.get("adapter"),
        "environment": common.environment(device),
        "load_time_s": load_s,
        "n_examples": len(sentences),
        "lora_params": int(lora_params),
        "shape": shape.to_dict(),
        "peak_tflops": peak,
        "forms": results,
        "child_wall_time_s": time.perf_counter() - started,
    }


def _unsloth_forwards(model: Any) -> list[tuple[Any, str, Any]]:
    """What Unsloth's fused LoRA patch replaces (the per-instance MLP forward and attention
    projection functions), so a benchmark can undo it before measuring the next form."""
    kept = []
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in getattr(getattr(inner, "model", inner), "layers", []):
        for module, attr in ((layer.mlp, "forward"), (layer.self_attn, "apply_qkv"), (layer.self_attn, "apply_o")):
            kept.append((module, attr, module.__dict__.get(attr, _ABSENT)))
    return kept


_ABSENT = object()


def _restore_forwards(kept: list[tuple[Any, str, Any]]) -> None:
    for module, attr, value in kept:
        if value is _ABSENT:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, value)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("forms"):
        return measure_forms(spec)
    cfg_dict = spec["config"]
    backend_name = backends.resolve_backend_name(cfg_dict["model"]["backend"])
    backends.early_import(backend_name)  # before transformers / peft

    import torch

    started = time.perf_counter()
    cfg = validate(cfg_dict, source="label benchmark spec")
    clock = _Clock()
    device = clock.device

    t0 = time.perf_counter()
    labeler = Labeler(cfg, adapter_path=spec.get("adapter"), device=device)
    load_s = time.perf_counter() - t0
    scorer = labeler.scorer
    model, tok, template, labels = scorer.model, scorer.tokenizer, scorer.template, scorer.labels
    lora_params = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    shape = flops.ModelShape.from_config(getattr(model.config, "text_config", None) or model.config)
    peak = float(spec.get("peak_tflops") or flops.H100_SXM_BF16_DENSE_TFLOPS)

    table = common.load_table(spec["data"], int(spec["n"]), cfg.data.split_seed, cfg.data, labels)
    sentences = table.column("sentence").to_pylist()
    n = len(sentences)
    batch_sizes = [int(b) for b in spec["batch_sizes"]]

    # 1. tokenisation alone
    tok_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ids, truncated = scorer.encode(sentences)
        tok_times.append(time.perf_counter() - t0)
    lengths = [len(x) for x in ids]
    prompt_tokens = sum(lengths)
    tok_s = min(tok_times)
    result: dict[str, Any] = {
        "backend": backend_name,
        "model": spec.get("model_label"),
        "model_path": cfg.model.name,
        "adapter": spec.get("adapter"),
        "environment": common.environment(device),
        "load_time_s": load_s,
        "n_examples": n,
        "prompt_tokens": prompt_tokens,
        "mean_prompt_tokens": prompt_tokens / max(1, n),
        "max_prompt_tokens": max(lengths) if lengths else 0,
        "truncated": int(truncated.sum()),
        "lora_params": int(lora_params),
        "adapter_form": labeler.adapter_form.to_dict(),
        "shape": shape.to_dict(),
        "peak_tflops": peak,
        "flops_convention": flops.SCORING_CONVENTION,
        "tokenisation": {
            "seconds": tok_s,
            "seconds_all": tok_times,
            "examples_per_s": n / tok_s if tok_s > 0 else None,
            "tokens_per_s": prompt_tokens / tok_s if tok_s > 0 else None,
        },
    }
    fl = flops.scoring_flops(shape, lengths, lora_params)

    # 2. scoring: row-count batches (max_batch_tokens 0) of whole prompts; token-budget
    # batches (no row cap: the labeller's default) of whole prompts, then with the shared
    # prefix computed once.
    shared_prefix = scorer.prefix_ids
    budgets = spec.get("token_budgets") or []
    settings = [(bs, 0, False, None) for bs in batch_sizes] + [(bs, t, False, None) for t in budgets for bs in (None, 64)]
    if shared_prefix:
        settings += [(None, t, True, None) for t in budgets]
    # Prompts cut shorter (as a preset with a small model.max_seq_length does).
    settings += [(None, budgets[0] if budgets else 0, bool(shared_prefix), cap) for cap in spec.get("max_lengths") or []]

    def scoring():
        out = []
        warm = sentences[: min(n, 2 * max(batch_sizes))]
        scorer.max_batch_tokens = 0
        for bs in (min(batch_sizes), max(batch_sizes)):
            scorer.batch_size = bs
            scorer.score(warm)
        full_length = scorer.max_length
        for bs, budget, reuse, cap in settings:
            scorer.batch_size, scorer.max_batch_tokens = bs or (None if budget else max(batch_sizes)), budget
            scorer.prefix_ids = shared_prefix if reuse else []
            scorer.max_length = cap or full_length
            clock.reset_peak()
            clock.sync()
            t0 = time.perf_counter()
            res = scorer.score(sentences)
            clock.sync()
            dt = time.perf_counter() - t0
            run_lengths = lengths if not cap else [len(x) for x in scorer.encode(sentences)[0]]
            padded = padded_tokens(run_lengths, scorer.batch_size, budget)
            label = f"{bs} rows" if not budget else f"<={budget} tok" + (f", <={bs} rows" if bs else "")
            label += (" +prefix" if reuse else "") + (f", cut at {cap}" if cap else "")
            out.append(
                {
                    "batch_size": label,
                    "max_length": cap or full_length,
                    "max_batch_tokens": budget,
                    "reuse_prefix": reuse,
                    "seconds": dt,
                    "examples_per_s": n / dt,
                    "prompt_tokens_per_s": res.prompt_tokens / dt,
                    "computed_tokens_per_s": res.computed_tokens / dt,
                    "padded_tokens": padded,
                    "padding_fraction": 1 - sum(run_lengths) / padded if padded else 0.0,
                    "tokenisation_share": tok_s / dt,
                    "model_flops": fl["model_flops"],
                    "achieved_tflops": fl["model_flops"] / dt / 1e12,
                    "mfu": flops.mfu(fl["model_flops"], dt, peak),
                    "peak_memory_allocated_gib": clock.peak_gib(),
                    "finite": bool(torch.isfinite(torch.from_numpy(res.probs)).all()),
                    "predicted_share": {l: res.predicted().count(l) / n for l in labels},
                }
            )
        return out

    result["scoring"] = _phase(scoring)

    # 3. batched generate
    k = int(spec["max_new_tokens"])
    gen_sentences = sentences[: int(spec["generate_n"])]
    gen_lengths = lengths[: len(gen_sentences)]

    def generate_batched():
        out = []
        if not gen_sentences:
            return out
        scorer.batch_size, scorer.max_batch_tokens, scorer.prefix_ids = min(batch_sizes), 0, []
        scorer.generate(gen_sentences[: min(len(gen_sentences), 2 * min(batch_sizes))], k)
        for bs in batch_sizes:
            scorer.batch_size = bs
            clock.reset_peak()
            clock.sync()
            t0 = time.perf_counter()
            res = scorer.generate(gen_sentences, k)
            clock.sync()
            dt = time.perf_counter() - t0
            out.append(
                {
                    "batch_size": bs,
                    "n": len(gen_sentences),
                    "max_new_tokens": k,
                    "seconds": dt,
                    "examples_per_s": len(gen_sentences) / dt,
                    "prompt_tokens_per_s": res.prompt_tokens / dt,
                    "padding_fraction": 1 - sum(gen_lengths) / max(1, padded_tokens(gen_lengths, bs)),
                    "parse_failed": int(res.parse_failed.sum()),
                    "peak_memory_allocated_gib": clock.peak_gib(),
                }
            )
        return out

    result["generate_batched"] = _phase(generate_batched)

    # 4. the naive per-row generate loop
    row_sentences = sentences[: int(spec["per_row_n"])]

    def generate_per_row():
        if not row_sentences:
            return {"n": 0}
        model.eval()

        def one(sentence: str) -> tuple[int, int, str | None]:
            enc = tok(template.prompt(sentence), return_tensors="pt").to(device)
            with torch.inference_mode():
                out = model.generate(
                    **enc, max_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
                )
            width = enc["input_ids"].shape[1]
            text = tok.decode(out[0, width:], skip_special_tokens=True)
            return width, int(out.shape[1] - width), labels.parse_generated(text)

        one(row_sentences[0])  # warm-up
        clock.reset_peak()
        clock.sync()
        t0 = time.perf_counter()
        done = [one(s) for s in row_sentences]
        clock.sync()
        dt = time.perf_counter() - t0
        return {
            "n": len(row_sentences),
            "max_new_tokens": k,
            "seconds": dt,
            "examples_per_s": len(row_sentences) / dt,
            "prompt_tokens_per_s": sum(d[0] for d in done) / dt,
            "new_tokens": sum(d[1] for d in done),
            "parse_failed": sum(d[2] is None for d in done),
            "peak_memory_allocated_gib": clock.peak_gib(),
        }

    result["generate_per_row"] = _phase(generate_per_row)
    result["child_wall_time_s"] = time.perf_counter() - started
    failed = [
        name
        for name in ("scoring", "generate_batched", "generate_per_row")
        if isinstance(result[name], dict) and "error" in result[name]
    ]
    if failed:
        result["error"] = f"phases failed: {failed}"
    return result


def child_main(argv: list[str] | None = None) -> int:
    return common.child_main(measure, "One labelling benchmark run (a child of jobs/benchmark.py label).", argv)[0]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(child_main())
