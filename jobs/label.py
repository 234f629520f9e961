"""Label a large dataset with a fine-tuned (or zero-shot) model on Ray Data; print one JSON line.

    python jobs/label.py --input data/demo/sentiment_demo.csv --output runs/label-demo \\
        --adapter runs/demo/adapter label.write_submission=true
    python jobs/label.py --config llama31_8b_multilingual --adapter s3://.../adapter \\
        --input 's3://bucket/unlabelled/*.parquet' --output /shared/label-2026-01
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \\
        python jobs/label.py --config demo --input /shared/in.csv --output /shared/out

The config decides model, label set, prompt, batch size, actors (label.num_actors; 0 = one
per GPU) and mode (label.mode=scoring|generate). Rerunning the same command after a crash
finishes only the missing work units; --overwrite starts the output folder over.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run from a checkout (python jobs/label.py) or an uploaded working dir without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sentiment_ray.job_args import config_parser

    parser = config_parser(__doc__.split("\n")[0], "label.batch_size=128 label.mode=generate")
    parser.add_argument("--input", required=True, help="file, glob, directory or URI of CSV/Parquet/JSONL")
    parser.add_argument("--output", required=True, help="output folder (local, shared, or a URI)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder (<run>/adapter); omit for zero-shot")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run's outputs in --output")
    parser.add_argument(
        "--rows-per-unit", type=int, default=None,
        help="rows per work unit (the unit of resume and of output shards); default 50000",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sentiment_ray.job_args import load_config_or_none

    cfg = load_config_or_none(args)
    if cfg is None:
        return 2

    from sentiment_ray.data import DataError
    from sentiment_ray.label import LabelError, label_dataset

    try:
        summary = label_dataset(
            cfg, args.input, args.output, args.adapter, overwrite=args.overwrite, rows_per_unit=args.rows_per_unit
        )
    except (DataError, LabelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
