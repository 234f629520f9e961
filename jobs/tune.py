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
import os
import sys
from pathlib import Path

# Run from a checkout (python jobs/tune.py) or an uploaded working dir without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="llama31_8b_tune", help="preset name (sentiment_ray/configs) or YAML path")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster this job starts (not used when joining one)"
    )
    parser.add_argument("--report-only", action="store_true", help="rebuild table, plot and best/ from the experiment folder")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=8 train.max_steps=70")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sentiment_ray.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and "://" not in cfg.run.storage_path and not os.path.isabs(cfg.run.storage_path):
        print(
            f"warning: run.storage_path={cfg.run.storage_path!r} is relative inside a Ray job: the experiment goes to "
            f"{os.path.abspath(cfg.run.storage_path)}, the job's temporary working dir",
            file=sys.stderr,
        )

    from sentiment_ray import tune

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
