"""What every job entry point (`jobs/*.py`, `sentiment-ray <command>`) shares: the
`--config` + `key=value` overrides arguments, loading the config with a readable error, and
the relative-storage warning. Pure: no heavy imports."""

from __future__ import annotations

import argparse
import os
import sys

from sentiment_ray.config import ConfigError, ExperimentConfig, load_config


def job_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description keeps its line breaks (the usage examples)."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def config_parser(description: str, overrides_example: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = job_parser(description, prog)
    parser.add_argument("--config", default="demo", help="preset name (sentiment_ray/configs) or YAML path (default: %(default)s)")
    parser.add_argument(
        "overrides", nargs="*", help=f"dotted config overrides key=value, validated, e.g. {overrides_example}"
    )
    return parser


def load_config_or_none(args: argparse.Namespace) -> ExperimentConfig | None:
    """The validated config, or None after printing why it is invalid (exit code 2)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


def warn_if_storage_is_job_local(cfg: ExperimentConfig, what: str = "results") -> None:
    """Inside `ray job submit` the working dir is a temporary copy: relative storage vanishes."""
    path = cfg.run.storage_path
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and "://" not in path and not os.path.isabs(path):
        print(
            f"warning: run.storage_path={path!r} is relative inside a Ray job: {what} go to "
            f"{os.path.abspath(path)}, the job's temporary working dir",
            file=sys.stderr,
        )
