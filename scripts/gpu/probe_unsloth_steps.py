#!/usr/bin/env python3
"""Bare Unsloth QLoRA step-time probe (no Ray): where do the seconds of one optimizer step go?

Loads the demo model (SmolLM2-135M-Instruct) through Unsloth in 4-bit, adds LoRA r=16 on all 7
projections, trains with TRL's SFTTrainer (adamw_8bit, batch 8, prompt-completion records from
data/demo/sentiment_demo.csv built with sentiment_ray.prompts.PromptTemplate), and prints, per
variant, per-step wall times, tokens per step, compiled-graph counts, peak GPU memory and losses.

Variants are '+'-joined tokens (run one after the other in this process; env-var variants such
as UNSLOTH_COMPILE_DISABLE=1 need their own process because Unsloth reads them at import):
    auto        padding_free left unset: Unsloth chooses (padding-free on an H100)
    padfree     padding_free=True            padded    padding_free=False (pad to batch max)
    pad64       padded, pad_to_multiple_of=64
    fixed       padded to max_length every step (pad_to_multiple_of=max_length)
    packed      packing=True, max_length=2048 (model max_seq_length 2048)
    nogc        use_gradient_checkpointing=False     gctrue   =True (torch's)   (default "unsloth")
    bsN         per-device batch N (default --batch)
    prof        torch.profiler table of step --profile-step, cProfile of the step after it

Run on the GPU machine (see scripts/gpu/README.md), e.g.
    python3 scripts/gpu/probe_unsloth_steps.py --variants auto+prof,pad64,nogc --steps 15 \
        --out $OUT/probe.jsonl
Locally (CPU, no unsloth) the same code paths minus Unsloth run with --backend hf, for testing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

T_START = time.time()
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = {"auto", "padfree", "padded", "pad64", "fixed", "packed", "nogc", "gctrue", "prof"}


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


def parse_variant(spec: str) -> dict:
    toks = spec.split("+")
    bad = [t for t in toks if t not in TOKENS and not (t.startswith("bs") and t[2:].isdigit())]
    if bad:
        raise SystemExit(f"unknown variant token(s) {bad}; known: {sorted(TOKENS)}")
    v = {"name": spec, "padding_free": None, "pad_to_multiple_of": None, "packing": False,
         "max_length": 512, "gc": "unsloth", "profile": "prof" in toks, "batch": None}
    for t in toks:
        if t.startswith("bs") and t[2:].isdigit():
            v["batch"] = int(t[2:])  # bsN: per-device batch N instead of --batch
    if "padfree" in toks:
        v["padding_free"] = True
    if "padded" in toks or "pad64" in toks or "fixed" in toks:
        v["padding_free"] = False
    if "pad64" in toks:
        v["pad_to_multiple_of"] = 64
    if "fixed" in toks:
        v["pad_to_multiple_of"] = v["max_length"]
    if "packed" in toks:
        v["packing"], v["max_length"] = True, 2048
    if "nogc" in toks:
        v["gc"] = False
    if "gctrue" in toks:
        v["gc"] = True
    return v


def load_records(csv_path: Path, n: int, eos: str, seed: int = 0) -> list[dict]:
    from sentiment_ray.config import PromptConfig
    from sentiment_ray.prompts import PromptTemplate

    tpl = PromptTemplate.from_config(PromptConfig())
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    return [tpl.prompt_completion(r["sentence"], r["label"], eos) for r in rows[:n]]


def dynamo_counts() -> tuple[int, int]:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"]), int(sum(counters["frames"].values()))
    except Exception:
        return -1, -1


def profiler_tables(prof, wall_s: float) -> str:
    ka = prof.key_averages()
    out = []
    for key in ("self_cuda_time_total", "self_device_time_total"):
        try:
            out.append(ka.table(sort_by=key, row_limit=20, max_name_column_width=60))
            break
        except Exception:
            continue
    out.append(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    gpu_us, launches, syncs = 0.0, 0, {}
    for e in ka:
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            gpu_us += dev
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
            launches += e.count
        if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                     "aten::item", "cudaMemcpyAsync", "aten::nonzero", "cudaHostAlloc",
                     "cudaMalloc", "cudaFree", "aten::to", "aten::copy_"):
            syncs[e.key] = (e.count, round(e.self_cpu_time_total / 1e3, 1))
    out.append(f"PROFILE SUMMARY: wall {wall_s*1e3:.1f} ms, GPU kernel time {gpu_us/1e3:.1f} ms "
               f"({100*gpu_us/1e3/max(wall_s*1e3,1e-9):.1f}% busy), kernel launches {launches}, "
               f"host-sync/copy ops (count, self cpu ms) {syncs}")
    return "\n".join(out)


def run_variant(v: dict, args, backend: str, model_path: str) -> dict:
    import gc

    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    max_seq = max(512, v["max_length"])
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            model_path, load_in_4bit=True, max_seq_length=max_seq, dtype=None)
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS,
            use_gradient_checkpointing=v["gc"], random_state=3407)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if v["gc"]:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=PROJECTIONS,
                                                 task_type="CAUSAL_LM"))
    load_s = time.time() - t0
    log(f"[{v['name']}] model loaded in {load_s:.1f}s")

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    batch = v["batch"] or args.batch
    n_rows = args.steps * batch * (40 if v["packing"] else 1) + 64
    recs = load_records(REPO / args.csv, min(n_rows, 4000), tok.eos_token)
    ds = Dataset.from_list(recs)
    cfg_kwargs = dict(
        output_dir=f"/tmp/probe-{os.getpid()}-{v['name']}", per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=2e-4,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", seed=3407, max_length=v["max_length"], packing=v["packing"],
        dataloader_num_workers=0, optim="adamw_8bit" if cuda else "adamw_torch",
        bf16=cuda, fp16=False, use_cpu=not cuda, disable_tqdm=True,
    )
    if v["padding_free"] is not None:
        cfg_kwargs["padding_free"] = v["padding_free"]
    if v["pad_to_multiple_of"] is not None:
        cfg_kwargs["pad_to_multiple_of"] = v["pad_to_multiple_of"]
    cfg = SFTConfig(**cfg_kwargs)

    times: list[float] = []
    cycles: list[float] = []
    graphs: list[int] = []
    tok_stats: list[tuple] = []
    prof_text: list[str] = []
    state = {"t": 0.0, "last_end": None, "g0": dynamo_counts(), "prof": None, "cprof": None,
             "t_variant": time.time()}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, st, control, **kw):
            k = st.global_step  # 0-based index of the step about to run
            if v["profile"] and k == args.profile_step:
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                state["prof"] = profile(activities=acts)
                state["prof"].__enter__()
            if v["profile"] and k == args.profile_step + 1:
                import cProfile
                state["cprof"] = cProfile.Profile()
                state["cprof"].enable()
            sync()
            state["t"] = time.perf_counter()

        def on_step_end(self, a, st, control, **kw):
            sync()
            now = time.perf_counter()
            dt = now - state["t"]
            k = st.global_step - 1
            times.append(dt)
            if state["last_end"] is not None:
                cycles.append(now - state["last_end"])
            state["last_end"] = now
            g = dynamo_counts()
            graphs.append(g[0] - state["g0"][0])
            state["g0"] = g
            if state["prof"] is not None:
                state["prof"].__exit__(None, None, None)
                prof_text.append(f"=== torch.profiler, variant {v['name']}, step {k} ===\n"
                                 + profiler_tables(state["prof"], dt))
                state["prof"] = None
            if state["cprof"] is not None:
                import io
                import pstats
                state["cprof"].disable()
                s = io.StringIO()
                ps = pstats.Stats(state["cprof"], stream=s)
                ps.sort_stats("cumulative").print_stats(35)
                ps.sort_stats("tottime").print_stats(25)
                prof_text.append(f"=== cProfile, variant {v['name']}, step {k} (wall {dt:.3f}s "
                                 f"without cProfile overhead unknown) ===\n" + s.getvalue())
                state["cprof"] = None
            shape, real = tok_stats[-1] if tok_stats else (None, None)
            log(f"[{v['name']}] step {k:3d}  {dt*1e3:8.1f} ms  batch {shape} real_tokens {real}"
                f"  new_graphs {graphs[-1]}")
            if time.time() - state["t_variant"] > args.variant_max_s:
                log(f"[{v['name']}] variant time cap {args.variant_max_s}s reached: stopping")
                control.should_training_stop = True

    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[StepTimer()])
    log(f"[{v['name']}] trainer built: padding_free={getattr(trainer.args, 'padding_free', None)} "
        f"packing={trainer.args.packing} pad_to_multiple_of={trainer.args.pad_to_multiple_of} "
        f"collator={type(trainer.data_collator).__name__}")

    if not cuda:
        # Local dry runs only: TRL 1.15's SFTTrainer.compute_loss always calls its Triton fused
        # LM head, which a CPU torch lacks (_ChunkedLogProbFunction is None); use Trainer's loss.
        import types

        from transformers import Trainer
        trainer.compute_loss = types.MethodType(Trainer.compute_loss, trainer)

    orig_step = trainer.training_step

    def counting_step(model_, inputs, *a, **kw):
        ids = inputs.get("input_ids")
        shape = tuple(ids.shape) if ids is not None else None
        am = inputs.get("attention_mask")
        if am is not None and ids is not None and am.shape == ids.shape:
            real = int(am.sum())
        else:
            real = int(ids.numel()) if ids is not None else None
        tok_stats.append((shape, real))
        return orig_step(model_, inputs, *a, **kw)

    trainer.training_step = counting_step
    t_train = time.time()
    trainer.train()
    train_s = time.time() - t_train

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    skip = min(args.warmup_skip, max(len(times) - 1, 0))
    profiled = {args.profile_step, args.profile_step + 1} if v["profile"] else set()
    keep = [i for i in range(skip, len(times)) if i not in profiled]  # profiled steps are slower
    steady = [times[i] for i in keep]
    steady_tok = [tok_stats[i][1] for i in keep if tok_stats[i][1] is not None]
    steady_pad = [tok_stats[i][0][0] * tok_stats[i][0][1] for i in keep
                  if tok_stats[i][0] and len(tok_stats[i][0]) == 2]
    res = {
        "variant": v["name"], "backend": backend, "settings": {k: v[k] for k in v if k != "name"},
        "load_s": round(load_s, 2), "train_s": round(train_s, 2), "steps": len(times),
        "step_s": [round(t, 4) for t in times], "cycle_s": [round(t, 4) for t in cycles],
        "first_step_s": round(times[0], 3) if times else None,
        "steady_median_s": round(statistics.median(steady), 4) if steady else None,
        "steady_mean_s": round(statistics.mean(steady), 4) if steady else None,
        "tokens_per_step_mean": round(statistics.mean(steady_tok), 1) if steady_tok else None,
        "real_tokens_per_s": round(sum(steady_tok) / sum(steady), 1) if steady_tok and steady else None,
        "padded_tokens_per_s": round(sum(steady_pad) / sum(steady), 1) if steady_pad and steady else None,
        "new_graphs_per_step": graphs,
        "batch_shapes": [t[0] for t in tok_stats[: len(times)]],
        "loss": [round(x, 4) for x in losses],
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("UNSLOTH_", "TORCH"))},
    }
    for t in prof_text:
        print(t, flush=True)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="auto+prof,pad64,fixed,nogc,packed")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--profile-step", type=int, default=8)
    ap.add_argument("--warmup-skip", type=int, default=3, help="steps left out of steady stats")
    ap.add_argument("--variant-max-s", type=float, default=150.0)
    ap.add_argument("--deadline-s", type=float, default=1e9,
                    help="start no new variant after this many seconds since process start")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--csv", default="data/demo/sentiment_demo.csv")
    ap.add_argument("--backend", choices=["unsloth", "hf"], default="unsloth")
    ap.add_argument("--out", default=None, help="append one JSON line per variant here")
    args = ap.parse_args()
    variants = [parse_variant(s) for s in args.variants.split(",") if s]

    if args.backend == "unsloth":
        t = time.time()
        import unsloth  # noqa: F401  -- before transformers/trl/peft, or its patches are lost
        log(f"import unsloth: {time.time() - t:.1f}s (unsloth {unsloth.__version__})")
    import torch
    import transformers
    import trl

    log(f"torch {torch.__version__} cuda {torch.version.cuda} "
        f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'} "
        f"transformers {transformers.__version__} trl {trl.__version__}")
    from sentiment_ray.models import resolve_model_path

    model_path = resolve_model_path(args.model)
    results = []
    for v in variants:
        if time.time() - T_START > args.deadline_s:
            log(f"deadline reached: skipping {v['name']}")
            continue
        try:
            res = run_variant(v, args, args.backend, model_path)
        except Exception as e:  # keep going: one failing variant must not lose the others
            import traceback
            traceback.print_exc()
            res = {"variant": v["name"], "error": f"{type(e).__name__}: {e}"[:2000]}
        results.append(res)
        print("RESULT " + json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")

    print("\nSUMMARY  variant | steps | first s | steady median s | tokens/step | real tok/s | "
          "padded tok/s | graphs/step | peak alloc GiB | loss first->last")
    for r in results:
        if "error" in r:
            print(f"SUMMARY  {r['variant']} | ERROR {r['error'][:200]}")
            continue
        lo = r["loss"]
        print(f"SUMMARY  {r['variant']} | {r['steps']} | {r['first_step_s']} | {r['steady_median_s']} | "
              f"{r['tokens_per_step_mean']} | {r['real_tokens_per_s']} | {r['padded_tokens_per_s']} | "
              f"{r['new_graphs_per_step']} | {r['peak_alloc_gib']} | "
              f"{lo[0] if lo else None}->{lo[-1] if lo else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
