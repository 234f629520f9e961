"""The benchmark job (`sentiment-ray benchmark`, jobs/benchmark.py): its parser and what it
runs. The measuring lives in train_bench.py and label_bench.py, each run in a child process."""

from __future__ import annotations

import argparse
from pathlib import Path

from sentiment_ray.bench import common, flops, label_bench, train_bench

DESCRIPTION = """\
Benchmark training speed/memory (unsloth vs hf) and labelling throughput; print a table.

    sentiment-ray benchmark train --model llama8b-shape --out $OUT      # GPU: unsloth then hf, 3 + 8 steps
    sentiment-ray benchmark train --model smollm2-135m-instruct --out $OUT
    sentiment-ray benchmark label --model llama8b-shape --out $OUT      # scoring / generate, batch sweep
    sentiment-ray benchmark label --model llama8b-shape --adapter random --pipeline-rows 41035 --out $OUT
    sentiment-ray benchmark label --model llama8b-shape --adapter random --forms all --out $OUT   # adapter forms
    sentiment-ray benchmark train --model tests-tiny-dir --smoke --out /tmp/bench   # CPU smoke (CI)

`--model`: a random-weight shape (llama8b-shape, llama1b-shape, tiny-shape; built once into
the cache in its own process), the alias smollm2-135m-instruct, or a local model folder.
Trailing `key=value` arguments override the config preset (`--config`, default the
reference run llama31_8b_multilingual). Full JSON goes to `--out`; see docs/benchmarks.md.
"""


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def benchmark_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(
        dest="mode",
        required=True,
        metavar="mode",
        help="train: training speed, memory and MFU per backend; label: labelling throughput",
    )
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--model", default="smollm2-135m-instruct", help="shape name, alias or local folder")
    shared.add_argument("--out", default="runs/benchmarks", help="folder for the JSON results and child logs")
    shared.add_argument(
        "--backends", type=_csv, default=None, help="comma list of unsloth,hf (default: both on a GPU with unsloth, else hf)"
    )
    shared.add_argument("--config", default=common.DEFAULT_CONFIG, help="config preset or YAML the runs start from")
    shared.add_argument("--data", default=None, help=f"labelled CSV/Parquet/JSONL (default: {common.DEFAULT_DATA})")
    shared.add_argument(
        "--peak-tflops",
        type=float,
        default=flops.H100_SXM_BF16_DENSE_TFLOPS,
        help="MFU denominator (default: H100 SXM dense bf16)",
    )
    shared.add_argument("--tokenizer", default="smollm2-135m-instruct", help="tokenizer saved with a random-weight shape")
    shared.add_argument("--cache-dir", default=None, help="where shapes are built (default: the sentiment-ray cache)")
    shared.add_argument("--child-timeout", type=float, default=480.0, help="seconds per child process")
    shared.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check (CI)")
    shared.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.max_seq_length=1024")

    train = sub.add_parser("train", parents=[shared], help="training tokens/s, step time, peak memory, MFU, losses")
    train.add_argument("--warmup-steps", type=int, default=None, help="untimed optimizer steps first (default 3; smoke 1)")
    train.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 8; smoke 2)")
    train.add_argument(
        "--loop", choices=["trainer", "bare", "both"], default="trainer", help="TRL SFTTrainer loop, a bare loop, or both"
    )
    train.add_argument("--max-rows", type=int, default=0, help="training rows (0: enough for the steps)")

    label = sub.add_parser("label", parents=[shared], help="scoring / batched generate / per-row generate throughput")
    label.add_argument(
        "--adapter", default=None, help="LoRA adapter folder to attach, or `random` (the preset's LoRA shape, random weights)"
    )
    label.add_argument(
        "--pipeline-rows", type=int, default=0, help="also run the whole labelling job (jobs/label.py) on this many rows (0: no)"
    )
    label.add_argument(
        "--forms",
        type=_csv,
        default=None,
        help="compare how the adapter is held instead of the batch sweep: any of none,unmerged,fused,merged,merged+compiled (or all)",
    )
    label.add_argument(
        "--max-lengths", type=_csv_ints, default=None, help="also score with prompts cut to these lengths (e.g. 192)"
    )
    label.add_argument("--n", type=int, default=None, help="sentences scored per batch size (default 2048; smoke 24)")
    label.add_argument("--batch-sizes", type=_csv_ints, default=None, help="sweep (default 16,32,64,128,256; smoke 4,8)")
    label.add_argument(
        "--token-budgets",
        type=_csv_ints,
        default=None,
        help="also score with these label.max_batch_tokens budgets (default 8192,16384,32768,65536; smoke 256)",
    )
    label.add_argument("--generate-n", type=int, default=None, help="sentences for batched generate (default 512; smoke 8)")
    label.add_argument("--per-row-n", type=int, default=None, help="sentences for per-row generate (default 64; smoke 4)")
    label.add_argument(
        "--max-new-tokens", type=int, default=None, help="generate length (default: label.max_new_tokens; smoke 2)"
    )
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    return benchmark_parser(prog).parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark `args` ask for; the summary (mode, results file, each run's outcome).
    A run that failed is a BenchError naming it, after the table showed it."""
    common_kwargs = dict(
        model=args.model,
        out_dir=args.out,
        backends=args.backends,
        config=args.config,
        overrides=args.overrides,
        data=args.data,
        peak_tflops=args.peak_tflops,
        tokenizer=args.tokenizer,
        cache_dir=args.cache_dir,
        child_timeout=args.child_timeout,
        smoke=args.smoke,
    )
    if args.mode == "train":
        result = train_bench.run_train_benchmark(
            warmup=args.warmup_steps if args.warmup_steps is not None else (1 if args.smoke else 3),
            steps=args.steps if args.steps is not None else (2 if args.smoke else 8),
            loops=["trainer", "bare"] if args.loop == "both" else [args.loop],
            max_rows=args.max_rows,
            **common_kwargs,
        )
    else:
        result = label_bench.run_label_benchmark(
            adapter=args.adapter,
            pipeline_rows=args.pipeline_rows,
            forms=None
            if args.forms is None
            else (["none", "unmerged", "fused", "merged", "merged+compiled"] if args.forms == ["all"] else args.forms),
            max_lengths=args.max_lengths,
            n=args.n or (24 if args.smoke else 2048),
            batch_sizes=args.batch_sizes or ([4, 8] if args.smoke else [16, 32, 64, 128, 256]),
            token_budgets=args.token_budgets or ([256] if args.smoke else None),
            generate_n=args.generate_n if args.generate_n is not None else (8 if args.smoke else 512),
            per_row_n=args.per_row_n if args.per_row_n is not None else (4 if args.smoke else 64),
            max_new_tokens=args.max_new_tokens or (2 if args.smoke else None),
            **common_kwargs,
        )
    results = str(Path(args.out).resolve() / (train_bench.RESULT_FILE if args.mode == "train" else label_bench.RESULT_FILE))
    runs = {name: ("failed" if "error" in outcome else "ok") for name, outcome in result["runs"].items()}
    failed = [name for name, outcome in runs.items() if outcome == "failed"]
    if failed:
        raise common.BenchError(
            f"{len(failed)} of {len(runs)} benchmark runs failed ({', '.join(failed)}): their errors are in {results}"
        )
    return {"mode": args.mode, "model": args.model, "results": results, "runs": runs}


def closing_lines(summary: dict) -> list[str]:
    return [f"results    {summary['results']}"]
