"""Why do the unsloth and hf backends' losses drift apart? Both train the same model from the
same seeded LoRA start on the same batches (checked: each run hashes its first micro-batches),
under variants that each switch one suspected difference off, and the per-step losses and
gradient norms are compared (docs/benchmarks.md, "Backend agreement").

    python benchmarks/backend_agreement.py --out /tmp/agreement             # a CUDA GPU with unsloth
    python benchmarks/backend_agreement.py --variants frozen,16bit --steps 10 --out /tmp/agreement

Variants (overrides on top of the demo preset, 4-bit, bfloat16):
  preset   as the training job runs it
  frozen   learning rate 1e-9: the forward passes alone, over 20 batches
  16bit    no 4-bit quantisation of the base
  lr/10    a ten times smaller learning rate: does a difference grow with the step size?
Writes <out>/agreement.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASE = ["model.load_in_4bit=true", "model.dtype=bfloat16"]
VARIANTS = {
    "preset": [],
    "frozen": ["train.learning_rate=1e-9"],
    "16bit": ["model.load_in_4bit=false"],
    "lr/10": ["train.learning_rate=3e-5"],
}


def relative(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return abs(a - b) / abs(b)


def summarise(name: str, result: dict) -> dict:
    u, h = result["runs"]["unsloth"], result["runs"]["hf"]
    if "error" in u or "error" in h:
        return {"variant": name, "error": u.get("error") or h.get("error")}
    diffs = [relative(a, b) for a, b in zip(u["losses"], h["losses"])]
    finite = [d for d in diffs if d is not None]
    return {
        "variant": name,
        "same_batches": u["batch_fingerprints"] == h["batch_fingerprints"],
        "loss_first": (u["losses"][0], h["losses"][0]),
        "loss_last": (u["losses"][-1], h["losses"][-1]),
        "rel_diff_by_step": diffs,
        "max_rel_diff": max(finite) if finite else None,
        "first_step_over_2pct": next((i + 1 for i, d in enumerate(diffs) if d is not None and d > 0.02), None),
        "grad_norm_first": ((u.get("grad_norms") or [None])[0], (h.get("grad_norms") or [None])[0]),
        "learning_rate_first": ((u.get("learning_rates") or [None])[0], (h.get("learning_rates") or [None])[0]),
        "numerics": {"unsloth": u.get("numerics"), "hf": h.get("numerics")},
    }


def table(rows: list[dict]) -> str:
    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    lines = ["variant  same batches  loss 1 unsloth/hf  rel  max rel  first >2%  grad-norm 1 unsloth/hf  loss last unsloth/hf"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<8} error: {r['error'][:200]}")
            continue
        (u1, h1), (un, hn), (g1, gh) = r["loss_first"], r["loss_last"], r["grad_norm_first"]
        lines.append(
            f"{r['variant']:<8} {str(r['same_batches']):<13} {f(u1)}/{f(h1)}  {f(r['rel_diff_by_step'][0], '.3f')}"
            f"  {f(r['max_rel_diff'], '.3f')}  {str(r['first_step_over_2pct'] or '-'):<9}  {f(g1, '.3f')}/{f(gh, '.3f')}"
            f"  {f(un)}/{f(hn)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sentiment_ray.bench.train_bench import run_train_benchmark

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    rows = []
    for name in args.variants.split(","):
        result = run_train_benchmark(
            model=args.model,
            out_dir=str(Path(args.out) / name.replace("/", "-")),
            backends=["unsloth", "hf"],
            config="demo",
            warmup=0,
            steps=args.steps,
            overrides=BASE + VARIANTS[name],
            child_timeout=300,
        )
        rows.append(summarise(name, result))
        print(table(rows[-1:]), flush=True)
    Path(args.out, "agreement.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
