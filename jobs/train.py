"""Fine-tune a model into a sentiment classifier on Ray Train; print one JSON line at the end.

    python jobs/train.py                                    # the demo preset, local Ray cluster
    python jobs/train.py --config llama31_8b_multilingual train.max_steps=100
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \\
        python jobs/train.py --config demo run.storage_path=/shared/runs

Under `ray job submit` give run.storage_path as an absolute path or a URI: a relative one
lands in the job's temporary copy of the working dir. With Ray's token authentication on
(Ray 2.60 turns it on when ~/.ray/auth_token exists), the `ray job` CLI sends the token only
with RAY_AUTH_MODE=token in its environment (token from RAY_AUTH_TOKEN or ~/.ray/auth_token).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run from a checkout (python jobs/train.py) or an uploaded working dir without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sentiment_ray.job_args import config_parser

    return config_parser(__doc__.split("\n")[0], "train.max_steps=120 run.name=demo-long").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sentiment_ray.job_args import load_config_or_none, warn_if_storage_is_job_local

    cfg = load_config_or_none(args)
    if cfg is None:
        return 2
    warn_if_storage_is_job_local(cfg)

    from sentiment_ray.train import run_training

    summary = run_training(cfg)
    print(json.dumps(summary, sort_keys=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
