"""The `sentiment-ray` command: one entry point for every job.

    sentiment-ray train  [--config demo] [key=value ...]
    sentiment-ray tune   [--config llama31_8b_tune] [--num-cpus N] [--report-only] [key=value ...]
    sentiment-ray label  --input PATH --output DIR [--adapter RUN/adapter] [key=value ...]
    sentiment-ray export --adapter RUN/adapter --output DIR [--dtype bfloat16] [key=value ...]
    sentiment-ray eval   --predictions LABEL_OUTPUT|FILE [--output DIR] [--experiment TUNE_DIR]
    sentiment-ray benchmark train|label [--model SHAPE] [--out DIR] [key=value ...]

Each command's parser and main function live here and are the same ones `jobs/<command>.py`
runs (those scripts stay the `ray job submit -- python jobs/<command>.py` entry points: they
need no installed package). `sentiment-ray <command> --help` lists every option. Every
command ends through `terminal.runner.run_job`: a short summary then one JSON line, or one
`error:` line.

Light at import time: the recipes import torch, transformers and ray inside their functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sentiment_ray import cluster
from sentiment_ray.bench import job as bench_job
from sentiment_ray.config import ExperimentConfig, load_config
from sentiment_ray.config_help import JOB_SECTIONS, config_help
from sentiment_ray.eval import layout as eval_layout
from sentiment_ray.eval import recipe as evaluate
from sentiment_ray.export import recipe as export
from sentiment_ray.label import outputs as label_outputs
from sentiment_ray.label.recipe import interrupted_line as label_interrupted_line
from sentiment_ray.label.recipe import label_dataset
from sentiment_ray.terminal import console, faults
from sentiment_ray.terminal.runner import Ending, run_job, stop_ray
from sentiment_ray.terminal.training import CommandLine, TrainTerminal, launcher, short_path
from sentiment_ray.train.recipe import run_training
from sentiment_ray.tune import recipe as tune_recipe

PROG = "sentiment-ray"

TRAIN_DESCRIPTION = """\
Fine-tune a model into a sentiment classifier on Ray Train. The terminal shows the phases,
a progress bar for the steps and a closing table (zero-shot against fine-tuned validation
metrics, where the run lives, the next command); the last line on stdout is the run's
summary as JSON. Everything Ray and the workers print goes to <run>/logs/ (--verbose also
prints it).

    python jobs/train.py                                    # the demo preset, local Ray cluster
    python jobs/train.py data.train_path=my.csv run.name=mine
    sentiment-ray train --config llama31_8b_multilingual data.train_path=s3://bucket/train.parquet
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --config demo

The model and the data are checked before Ray starts: a mistake is one line and exit code 1.
Rerunning the same command resumes the run (<run.storage_path>/<run.name>) from its last
checkpoint (every train.save_steps) when what defines the run is unchanged (model, data
content, LoRA shape, optimiser and schedule, labels, prompt; train.max_steps may grow);
otherwise it is refused naming the changed fields, and --new-run starts the run over
(docs/architecture.md lists what may change on resume).

Under `ray job submit` a relative run.storage_path is taken under ~/sentiment-ray on the
driver's machine (the job's working dir is a temporary copy); on several nodes give a URI or
a shared path. With Ray's token authentication on (Ray 2.60 turns it on when ~/.ray/auth_token exists), the `ray job` CLI sends the token only
with RAY_AUTH_MODE=token in its environment (token from RAY_AUTH_TOKEN or ~/.ray/auth_token).
MLflow: tracking.mlflow=auto|true|false, tracking.mlflow_tracking_uri (README, MLflow tracking).
"""

TUNE_DESCRIPTION = """\
Search training hyperparameters with Ray Tune (one Ray Train run per trial); promote the best
adapter; print the trials table and one JSON line at the end.

    python jobs/tune.py --config llama31_8b_tune                  # the `tune:` section of the YAML
    sentiment-ray tune --config llama31_8b_tune tune.num_samples=12 tune.scheduler=fifo
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \\
        python jobs/tune.py --config llama31_8b_tune run.storage_path=/shared/runs

Rerun the same command after an interruption to resume the experiment
(<run.storage_path>/<tune.experiment_name>): finished trials are kept, unfinished ones resume
from their last checkpoint. `--report-only` rewrites the table, plot, report.html and best/
from the experiment folder without training.
"""

LABEL_DESCRIPTION = """\
Label a large dataset with a fine-tuned (or zero-shot) model on Ray Data; print one JSON line.

    python jobs/label.py --input data/demo/sentiment_demo.csv --output runs/label-demo \\
        --adapter runs/demo/adapter label.write_submission=true
    sentiment-ray label --config llama31_8b_multilingual --adapter s3://.../adapter \\
        --input 's3://bucket/unlabelled/*.parquet' --output /shared/label-2026-01
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \\
        python jobs/label.py --config demo --input /shared/in.csv --output /shared/out

The config decides model, label set, prompt, token budget per batch, actors (label.num_actors; 0 = one
per GPU) and mode (label.mode=scoring|generate). Rerunning the same command after a crash
finishes only the missing work units; --overwrite starts the output folder over. One job at a
time writes an output folder: a second one is refused, naming the first (its lock,
<output>/_lock.json, is taken over once that job's process is gone, or a minute after its
last heartbeat when it ran on another host).
"""

EXPORT_DESCRIPTION = """\
Merge a LoRA adapter into its base model and save a standard Hugging Face folder (weights,
config, tokenizer) that plain `transformers.AutoModelForCausalLM.from_pretrained` loads;
print one JSON line.

    sentiment-ray export --config demo --adapter runs/demo/adapter --output runs/demo/merged
    python jobs/export.py --config llama31_8b_multilingual --adapter runs/ref/adapter \\
        --output /shared/llama-sentiment-merged --dtype bfloat16

The config names the base model (model.name) and the backend: on the unsloth backend (GPU)
Unsloth's `save_pretrained_merged(..., save_method="merged_16bit")` dequantises the 4-bit base
and merges; elsewhere peft's `merge_and_unload` merges into the base loaded in full precision
on the CPU (or GPU), then the weights are cast to --dtype.
"""

EVAL_DESCRIPTION = """\
Evaluate predictions against their gold labels and write a self-contained HTML report
(metrics table, per-language table, confusion matrix, reliability diagram; trial curves for a
tune experiment); print one JSON line.

    sentiment-ray eval --predictions runs/label-demo                 # a label job's output folder
    sentiment-ray eval --predictions preds.parquet --output reports/x # Parquet/CSV/JSONL file
    sentiment-ray eval --predictions runs/demo/validation_predictions.parquet
    sentiment-ray eval --experiment runs/tune                        # a tune experiment's trials

A predictions file needs the gold label column, a predicted label column (`pred_label` or
`predicted`) and optionally `p_<label>` probability columns (for the reliability diagram and
ECE) and a language column.
"""


# ----------------------------------------------------------------------------- shared


def job_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description keeps its line breaks (the usage examples)."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def config_parser(description: str, overrides_example: str, prog: str | None = None, *, job: str) -> argparse.ArgumentParser:
    """A job's parser: --config, the overrides, and (its epilog) every config field the job reads."""
    parser = job_parser(description, prog)
    parser.epilog = config_help(JOB_SECTIONS[job])
    parser.add_argument(
        "--config", default="demo", help="preset name (sentiment_ray/configs) or YAML path (default: %(default)s)"
    )
    parser.add_argument("overrides", nargs="*", help=f"dotted config overrides key=value, validated, e.g. {overrides_example}")
    return parser


def job_config(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config of `--config` and the overrides (a ConfigError is a user error:
    the runner prints its one line)."""
    return load_config(args.config, args.overrides)


def keep_storage_durable(cfg: ExperimentConfig) -> None:
    """Inside `ray job submit` the working dir is a temporary copy that Ray deletes: a
    relative run.storage_path is taken under ~/sentiment-ray instead (cluster.durable_path)."""
    cfg.run.storage_path = cluster.durable_path(cfg.run.storage_path)


# ----------------------------------------------------------------------------- train


def verbose_flag(parser: argparse.ArgumentParser, log_place: str) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"print everything Ray, the libraries and the workers print (also {console.LOG_ENV}=debug); "
        f"the job's log file ({log_place}) has it either way",
    )


def train_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = config_parser(TRAIN_DESCRIPTION, "train.max_steps=120 run.name=demo-long", prog, job="train")
    parser.add_argument(
        "--new-run",
        action="store_true",
        help="discard the checkpoints and outputs of an earlier run of the same run.name and start over "
        "(a rerun otherwise resumes it, refusing changed settings: docs/architecture.md)",
    )
    verbose_flag(parser, "<run>/logs/")
    return parser


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = train_parser(prog).parse_args(argv)
    command = CommandLine(launcher(prog, "train"), argv, args.config, list(args.overrides))
    terminal = TrainTerminal(command, verbose=console.verbose_requested(args.verbose))

    def job() -> dict:
        cfg = job_config(args)
        keep_storage_durable(cfg)
        return run_training(cfg, observer=terminal, new_run=args.new_run)

    return run_job("train", job, terminal.ending(), display=terminal.display)


# ----------------------------------------------------------------------------- tune


def tune_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = config_parser(TUNE_DESCRIPTION, "tune.num_samples=8 train.max_steps=70", prog, job="tune")
    parser.set_defaults(config="llama31_8b_tune")
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray cluster this job starts (not used when joining one)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild table, plot, report and best/ from the experiment folder"
    )
    return parser


def tune_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = tune_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = CommandLine(launcher(prog, "tune"), argv, args.config, list(args.overrides))

    def job() -> dict:
        cfg = job_config(args)
        keep_storage_durable(cfg)
        if args.report_only:
            return tune_recipe.report_only(cfg)
        return tune_recipe.run_tune(cfg, num_cpus=args.num_cpus)

    def interrupted(sig, err) -> str:
        return f"Tuning interrupted by {sig.name}: finished trials are kept; rerun the same command to resume the rest: {command.text()}"

    return run_job(
        "tune",
        job,
        Ending(
            finished=lambda summary: tune_lines(summary, command),
            interrupted=interrupted,
            closed=stop_ray,
            shown_as_json=tune_recipe.json_summary,
        ),
    )


def tune_lines(summary: dict, command: CommandLine) -> list[str]:
    """The tune job's closing lines: the best trial, where the report is, the next command."""
    lines = [
        f"experiment  {short_path(summary['experiment'])}  ({summary['trials']} trials: "
        + ", ".join(f"{n} {o}" for o, n in (summary.get("outcomes") or {}).items() if n)
        + ")"
    ]
    if summary.get("best_dir"):
        lines.append(
            f"best        trial {summary['best_trial']}: {summary['metric']} {summary['best_metric']}  "
            f"({short_path(summary['best_dir'])})"
        )
        lines.append(f"report      {short_path(summary['report'])}")
        parts = [command.sibling("label")]
        if command.config:
            parts += ["--config", command.config]
        parts += [
            "--adapter",
            short_path(summary["best_dir"]) + "/adapter",
            "--input",
            "YOUR_DATA.csv",
            "--output",
            short_path(summary["experiment"]) + "-labels",
        ]
        lines.append("next        " + " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts)))
    else:
        lines.append("warning: no trial completed: nothing was promoted to best/")
    return lines


# ----------------------------------------------------------------------------- label


def label_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = config_parser(LABEL_DESCRIPTION, "label.max_batch_tokens=65536 label.mode=generate", prog, job="label")
    parser.add_argument("--input", required=True, help="file, glob, directory or URI of CSV/Parquet/JSONL")
    parser.add_argument("--output", required=True, help="output folder (local, shared, or a URI)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder (<run>/adapter); omit for zero-shot")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run's outputs in --output")
    parser.add_argument(
        "--rows-per-unit",
        type=int,
        default=None,
        help="rows per work unit (the unit of resume and of output shards); default: label.rows_per_unit, else about four units per actor",
    )
    verbose_flag(parser, "named in the summary")
    return parser


@contextlib.contextmanager
def label_log(verbose: bool):
    """The labelling job's terminal shows its progress line, warnings and summary; what Ray,
    the libraries and the actors print goes to <cache>/logs/label-<date>.log (and, verbose,
    to the terminal too), named in the summary. The file is opened when the job starts Ray,
    and never in the output folder: a job that stops early leaves nothing there."""
    import ray.data  # noqa: F401 - configures its loggers on import: before the log takes them over

    log = console.RunLog(verbose=verbose)
    log.start()
    path = os.path.join(faults.logs_folder(), faults.log_file_name("label"))

    def open_file() -> None:
        try:
            log.open(path)
        except OSError as err:  # the log is a convenience, never the reason a job fails
            console.Display().warning(f"could not open the log {path}: {err}")
        log.capture_worker_output()

    log.before_ray_init()
    cluster.after_connect(open_file)
    try:
        yield log
    finally:
        cluster.after_connect(None)
        stop_ray()  # while Ray's output still goes to the log
        log.close()


def label_lines(summary: dict, command: CommandLine) -> list[str]:
    """The label job's closing lines: what was labelled, where, its warnings, the next command."""
    lines = label_outputs.terminal_lines(summary)
    labelled, total = summary.get("labelled"), summary.get("rows")
    counted = f"{labelled:,} rows labelled" if isinstance(labelled, int) else "labelled"
    if isinstance(total, int) and total != labelled:
        counted += f" of {total:,}"
    lines.append(f"output     {short_path(summary['output'])}  ({counted}, {summary.get('seconds', 0):.0f}s)")
    if summary.get("submission"):
        lines.append(f"submission {short_path(summary['submission'])}")
    if summary.get("metrics_path"):
        lines.append(f"metrics    {short_path(summary['metrics_path'])}")
    if summary.get("log"):
        lines.append(f"log        {short_path(summary['log'])}")
    if summary.get("truncated"):
        lines.append(
            f"warning: {summary['truncated']:,} rows were cut to fit model.max_seq_length or label.max_text_chars "
            "(column `truncated`)"
        )
    lines.append(f"next       {command.sibling('eval')} --predictions {shlex.quote(short_path(summary['output']))}")
    return lines


def label_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = label_parser(prog).parse_args(argv)
    command = CommandLine(launcher(prog, "label"), argv, args.config, list(args.overrides))
    logs: list[console.RunLog] = []

    def job() -> dict:
        cfg = job_config(args)
        args.output, args.adapter = cluster.durable_path(args.output), cluster.durable_input_path(args.adapter)
        with label_log(console.verbose_requested(args.verbose)) as log:
            logs.append(log)
            summary = label_dataset(
                cfg, args.input, args.output, args.adapter, overwrite=args.overwrite, rows_per_unit=args.rows_per_unit
            )
        return {**summary, "log": log.path}

    def interrupted(sig, err) -> str:
        # Ray is stopped by now (label_log): the units counted are all the committed ones.
        return label_interrupted_line(sig, cluster.durable_path(args.output), command.text())

    return run_job("label", job, Ending(finished=lambda summary: label_lines(summary, command), interrupted=interrupted))


# ----------------------------------------------------------------------------- export


def export_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = config_parser(EXPORT_DESCRIPTION, "model.name=/models/llama model.backend=hf", prog, job="export")
    parser.add_argument(
        "--adapter", required=True, help="LoRA adapter folder to merge (<run>/adapter or <experiment>/best/adapter)"
    )
    parser.add_argument(
        "--output", required=True, help="folder for the merged Hugging Face model (created; must be empty or absent)"
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the saved weights (default: %(default)s; the unsloth backend always saves 16-bit)",
    )
    parser.add_argument("--device", default=None, help="where to merge: cpu, cuda, cuda:1 (default: the first GPU, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --output folder")
    return parser


def export_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = export_parser(prog).parse_args(argv)
    command = CommandLine(launcher(prog, "export"), argv, args.config, list(args.overrides))

    def job() -> dict:
        cfg = job_config(args)
        args.output, args.adapter = cluster.durable_path(args.output), cluster.durable_input_path(args.adapter)
        console.hide_library_progress_bars()
        return export.export_merged(
            cfg, args.adapter, args.output, dtype=args.dtype, device=args.device, overwrite=args.overwrite
        )

    def finished(summary: dict) -> list[str]:
        merged = short_path(args.output)
        parts = [command.sibling("label")]
        if args.config != "demo":
            parts += ["--config", args.config]
        parts += ["--input", "YOUR_DATA.csv", "--output", f"{merged}-labels", f"model.name={merged}"]
        return [
            f"merged     {short_path(args.adapter)} into {merged}  ({args.dtype})",
            "next       " + " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts)),
        ]

    return run_job("export", job, Ending(finished=finished))


# ----------------------------------------------------------------------------- eval


def eval_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = job_parser(EVAL_DESCRIPTION, prog)
    parser.add_argument(
        "--predictions",
        default=None,
        help="a label job's output folder, a training run folder, or a Parquet/CSV/JSONL file (or glob) of predictions",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="a tune experiment folder (<run.storage_path>/<tune.experiment_name>): adds the trial curves",
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"folder for {eval_layout.REPORT_FILE} and {eval_layout.METRICS_FILE} (default: the --predictions folder, or the file's folder, or --experiment)",
    )
    parser.add_argument(
        "--labels", default=None, help="comma-separated label set in order (default: from the p_<label> columns or the data)"
    )
    parser.add_argument("--label-column", default=None, help="gold label column (default: the label job's, else label)")
    parser.add_argument(
        "--lang-column", default=None, help="language column for the per-language table (default: the label job's, else lang)"
    )
    parser.add_argument(
        "--label-map",
        default=None,
        help='JSON map from raw gold values to labels, e.g. \'{"0": "Negative", "1": "Positive"}\' (default: the label job\'s data.label_map)',
    )
    parser.add_argument("--title", default=None, help="page title (default: from the input's name)")
    return parser


def eval_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = eval_parser(prog)
    args = parser.parse_args(argv)
    if not args.predictions and not args.experiment:
        parser.error("give --predictions, --experiment, or both")

    try:
        label_map = json.loads(args.label_map) if args.label_map else None
    except ValueError as err:
        parser.error(f"--label-map is not JSON: {err}")

    def job() -> dict:
        return evaluate.evaluate_to_report(
            predictions=args.predictions,
            experiment=args.experiment,
            output=args.output,
            labels=args.labels.split(",") if args.labels else None,
            label_map=label_map,
            label_column=args.label_column,
            lang_column=args.lang_column,
            title=args.title,
        )

    def finished(summary: dict) -> list[str]:
        lines = [f"report     {short_path(summary['report'])}"]
        if summary.get("metrics"):
            lines.append(f"metrics    {short_path(summary['metrics'])}")
        return lines

    return run_job("eval", job, Ending(finished=finished))


# ----------------------------------------------------------------------------- benchmark


def benchmark_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return bench_job.benchmark_parser(prog)


def benchmark_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The benchmark job (jobs/benchmark.py's parser): its table as it runs, then one JSON
    line naming its results; a run that failed is an `error:` line (exit 1)."""
    args = bench_job.parse_args(argv, prog)
    return run_job("benchmark", lambda: bench_job.run(args), Ending(finished=bench_job.closing_lines))


# ----------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Command:
    summary: str
    parser: Callable[[str | None], argparse.ArgumentParser]
    main: Callable[..., int]


COMMANDS: dict[str, Command] = {
    "train": Command("fine-tune on Ray Train (jobs/train.py)", train_parser, train_main),
    "tune": Command("hyperparameter search on Ray Tune (jobs/tune.py)", tune_parser, tune_main),
    "label": Command("label a dataset on Ray Data (jobs/label.py)", label_parser, label_main),
    "export": Command("merge an adapter into a standard HF model folder (jobs/export.py)", export_parser, export_main),
    "eval": Command("metrics + HTML report from predictions or a tune experiment", eval_parser, eval_main),
    "benchmark": Command("training and labelling speed and memory (jobs/benchmark.py)", benchmark_parser, benchmark_main),
}


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune LLMs into sentiment classifiers and label datasets with them, on Ray.",
        epilog="`sentiment-ray <command> --help` lists the options of a command.",
    )
    parser.add_argument("command", choices=list(COMMANDS), help="; ".join(f"{name}: {c.summary}" for name, c in COMMANDS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's options (see sentiment-ray <command> --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`sentiment-ray <command> [options]`: runs the command's main with its own parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)  # prints help / the error and exits
        return 2
    command = argv[0]
    return COMMANDS[command].main(argv[1:], prog=f"{PROG} {command}")


if __name__ == "__main__":
    sys.exit(main())
