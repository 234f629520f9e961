"""Search training hyperparameters with Ray Tune (one Ray Train run per trial); promote the best
adapter; print the trials table and one JSON line at the end.

    python jobs/tune.py --config llama31_8b_tune                  # the `tune:` section of the YAML
    python jobs/tune.py --config llama31_8b_tune tune.num_samples=12 tune.scheduler=fifo
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \\
        python jobs/tune.py --config llama31_8b_tune run.storage_path=/shared/runs

Rerun the same command after an interruption to resume the experiment
(<run.storage_path>/<tune.experiment_name>): finished trials are kept, unfinished ones resume
from their last checkpoint. `--report-only` rewrites the table, plot and best/ from the
experiment folder without training.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Run from a checkout (python jobs/tune.py) or an uploaded working dir without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sentiment_ray.job_args import config_parser

    parser = config_parser(__doc__.split("\n")[0], "tune.num_samples=8 train.max_steps=70")
    parser.set_defaults(config="llama31_8b_tune")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster this job starts (not used when joining one)"
    )
    parser.add_argument("--report-only", action="store_true", help="rebuild table, plot and best/ from the experiment folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sentiment_ray.job_args import load_config_or_none, warn_if_storage_is_job_local

    cfg = load_config_or_none(args)
    if cfg is None:
        return 2
    warn_if_storage_is_job_local(cfg, "the experiment's files")

    from sentiment_ray import tune
    from sentiment_ray.config import ConfigError

    try:
        if args.report_only:
            prepared, space = tune.prepare(cfg)
            summary = tune.finalize(prepared, space, tune.experiment_path(prepared))
        else:
            summary = tune.run_tune(cfg, num_cpus=args.num_cpus)
    except (ConfigError, tune.TuneError) as err:
        print(err, file=sys.stderr)
        return 2
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # stops worker log forwarding: the JSON line is the last line
    print(tune.summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
