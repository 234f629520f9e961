"""CPU probe behind the demo preset's settings (docs/benchmarks.md): the demo model's
optimizer-step time through the training job's own trainer, float32 vs bfloat16 weights
(bf16 autocast), the preset's no gradient checkpointing vs checkpointing, and label-token
scoring throughput by batch size. Prints one JSON line.

    .venv/bin/python benchmarks/cpu_demo_probe.py          # ~3 minutes on 2 cores; run it alone
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS = 6  # the first two are warm-up
ROWS = 160


def step_seconds(dtype: str, checkpointing: str = "false") -> dict:
    import torch
    from transformers import TrainerCallback

    from sentiment_ray.backends import get_backend
    from sentiment_ray.config import load_config
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.prompts import PromptTemplate
    from sentiment_ray.train.data import build_train_dataset, load_labelled
    from sentiment_ray.train.trainer import build_sft_config, build_sft_trainer

    cfg = load_config(
        "demo",
        [f"model.dtype={dtype}", "model.backend=hf", f"train.max_steps={STEPS}", f"lora.gradient_checkpointing={checkpointing}"],
    )
    labels = LabelSet(cfg.prompt.labels)
    model, tokenizer = get_backend("hf").load_for_training(cfg, torch.device("cpu"))
    table = load_labelled(cfg.data.train_path, cfg.data, labels).table.slice(0, 8 * STEPS)
    dataset = build_train_dataset(cfg, table, tokenizer, PromptTemplate.from_config(cfg.prompt), labels)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = build_sft_config(cfg, torch.device("cpu"), out, world_size=1)
        args.save_strategy = "no"
        trainer = build_sft_trainer(model, args, dataset, tokenizer, callbacks=[Timer()])
        trainer.train()
    tokens = trainer.state.num_input_tokens_seen
    return {
        "dtype": dtype,
        "gradient_checkpointing": checkpointing,
        "step_s": [round(t, 2) for t in times],
        "median_step_s_after_warmup": round(statistics.median(times[2:]), 2),
        "tokens_per_step": round(tokens / STEPS),
    }


def scoring_tokens_per_s() -> list[dict]:
    """bf16 demo model + LoRA (the job's evaluations), 64- vs 16-row batches."""
    import torch

    from sentiment_ray.backends import get_backend
    from sentiment_ray.config import load_config
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.prompts import PromptTemplate
    from sentiment_ray.scoring import LabelScorer
    from sentiment_ray.train.data import load_labelled

    cfg = load_config("demo", ["model.backend=hf"])
    labels = LabelSet(cfg.prompt.labels)
    # With LoRA layers attached, as when the training job scores before and after training.
    model, tokenizer = get_backend("hf").load_for_training(cfg, torch.device("cpu"))
    sentences = load_labelled(cfg.data.train_path, cfg.data, labels).table.column(cfg.data.text_column).to_pylist()[:ROWS]
    out = []
    for batch in (64, 16):
        scorer = LabelScorer(model, tokenizer, PromptTemplate.from_config(cfg.prompt), labels, cfg.model.max_seq_length, batch)
        t0 = time.perf_counter()
        result = scorer.score(sentences)
        seconds = time.perf_counter() - t0
        out.append(
            {
                "batch_size": batch,
                "rows": ROWS,
                "seconds": round(seconds, 1),
                "prompt_tokens_per_s": round(result.prompt_tokens / seconds),
            }
        )
    return out


def main() -> None:
    import torch

    torch.set_num_threads(2)  # what the demo's Ray worker gets (run.cpus_per_worker)
    train = [step_seconds("float32"), step_seconds("bfloat16"), step_seconds("bfloat16", "true")]
    result = {"train": train, "scoring_bf16": scoring_tokens_per_s()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
