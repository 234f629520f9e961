"""Benchmarks: training speed/memory (unsloth vs hf) and labelling throughput.

    python jobs/benchmark.py train --model llama8b-shape --out $OUT
    python jobs/benchmark.py label --model llama8b-shape --out $OUT

`train_bench` / `label_bench`: the parent (runs one child process per backend, compares,
prints a table, writes JSON) and the child (`python -m ...  --spec --result`); `shapes`:
random-weight models with real architectures' dimensions; `flops`: the FLOPs/MFU
conventions (pure); `common`: what they share. See docs/benchmarks.md.

Light at import time: torch, transformers and unsloth are imported inside functions.
"""
