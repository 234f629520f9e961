"""The training job as a person sees it: the opening lines (where the run lives, whether it
resumes, what was checked), the phases and the step bar (console.py, fed by the worker's
events), the closing table, and what a failure means.

    terminal = TrainTerminal(CommandLine(launcher(prog, "train"), argv, args.config, overrides))
    run_job("train", lambda: run_training(cfg, observer=terminal), terminal.ending())
    # the recipe tells it its moments (train/observer.py); the runner shows the closing table,
    # where things are and the next command, or the failure

Failures (`explain`): a mistake in the input is one line, `error: <message>`; an exception
raised in the training worker is one line with its type and where its traceback is; a
worker or the cluster dying is one paragraph: what died, the last checkpoint, and that the
same command resumes from it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentiment_ray import cluster, compat
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.errors import UserError
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.uris import is_uri
from sentiment_ray.terminal import faults
from sentiment_ray.terminal.console import Display, RunLog, format_duration
from sentiment_ray.terminal.runner import Ending, stop_ray
from sentiment_ray.train import layout
from sentiment_ray.train.observer import TrainingObserver

# Overrides that the label job needs to load and prompt the same model the run trained.
_CARRIED_PREFIXES = (
    "model.",
    "prompt.",
    "data.text_column=",
    "data.label_column=",
    "data.id_column=",
    "data.lang_column=",
    "data.label_map=",
    "run.use_gpu=",
    "run.ray_address=",
)
_CHECKPOINT = re.compile(r"^checkpoint[-_](\d+)$")


@dataclass
class CommandLine:
    """How the job was started, to print "rerun the same command" and the next command."""

    launcher: str  # "python jobs/train.py" or "sentiment-ray train"
    args: list[str] = field(default_factory=list)
    config: str = "demo"
    overrides: list[str] = field(default_factory=list)

    def text(self) -> str:
        return " ".join([self.launcher, *(shlex.quote(a) for a in self.args)])

    def sibling(self, command: str) -> str:
        """The launcher of another job the same way (`python jobs/label.py`, `sentiment-ray label`)."""
        if self.launcher.startswith("sentiment-ray"):
            return f"sentiment-ray {command}"
        python, _, script = self.launcher.rpartition(" ")
        if python and script.endswith(".py"):
            return f"{python} {os.path.join(os.path.dirname(script), command + '.py')}"
        return f"python jobs/{command}.py"


def launcher(prog: str | None, script: str) -> str:
    """How this job was started, as a person would type it again from where they stand."""
    if prog:
        return prog
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else script
    if argv0.endswith(".py"):
        return f"{interpreter()} {short_path(os.path.abspath(argv0))}"
    return f"sentiment-ray {script}"


def interpreter() -> str:
    """`python` when that is the interpreter running this job (an active venv), else its path
    (`make demo` runs `.venv/bin/python` without activating the venv: a bare `python` would
    lack the project's packages)."""
    on_path = shutil.which("python")
    # The same folder, not the same file: a venv's python links to the system's.
    if on_path and os.path.dirname(os.path.abspath(on_path)) == os.path.dirname(os.path.abspath(sys.executable)):
        return "python"
    return shlex.quote(short_path(os.path.abspath(sys.executable)))


def short_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it (commands to copy)."""
    if not path or is_uri(path) or not os.path.isabs(path):
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def last_checkpoint(run_dir: str) -> tuple[int, str] | None:
    """(step, path) of the checkpoint a rerun of this run resumes from, or None: the one
    Ray Train registered last (its snapshot file), else the newest complete folder."""
    storage = Storage(run_dir)
    try:
        if not storage.is_dir():
            return None
        snapshot = storage.read_json_or_none(compat.RAY_TRAIN_SNAPSHOT_FILE)
        folders = set(storage.list_dirs())
    except (OSError, ValueError):
        return None
    if snapshot is not None:
        name = compat.latest_registered_checkpoint(snapshot)
        match = _CHECKPOINT.match(name or "")
        return (int(match.group(1)), storage.path(name)) if match and name in folders else None
    found = sorted(
        (int(m.group(1)), n) for n in folders if (m := _CHECKPOINT.match(n)) and storage.exists(f"{n}/trainer_state.json")
    )
    return (found[-1][0], storage.path(found[-1][1])) if found else None


# ============================================================================ the run's moments


class TrainTerminal(TrainingObserver):
    """The training job's terminal: the observer of `run_training`, then `finish` or `failed`."""

    wants_events = True

    def __init__(self, command: CommandLine, *, verbose: bool = False, display: Display | None = None):
        self.command = command
        self.verbose = verbose
        self.display = display or Display()
        self.log = RunLog(verbose=verbose, display=self.display)
        self.log.start()
        self.cfg: ExperimentConfig | None = None
        self.run_dir: str | None = None
        self.started = time.time()
        self.remote_log: str | None = None  # the log's place in an object-store run folder

    @property
    def log_path(self) -> str | None:
        return self.log.path

    # -- the run's moments

    def run_started(self, cfg: ExperimentConfig, run_dir: str, checked) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        saved = last_checkpoint(run_dir)
        if saved:
            self.display.phase(f"run {cfg.run.name}: {short_path(run_dir)} (resuming from its checkpoint at step {saved[0]})")
        else:
            self.display.phase(f"run {cfg.run.name}: {short_path(run_dir)}")
        for warning in checked.warnings:
            self.display.warning(warning)
        self.display.phase(checked.describe())

    def cluster_starting(self, cfg: ExperimentConfig) -> None:
        self.log.before_ray_init()
        if cluster.in_ray_job():
            self.display.phase("joining the job's Ray cluster")
        elif cluster.resolve_address(cfg.run.ray_address):
            self.display.phase(f"joining the Ray cluster at {cluster.resolve_address(cfg.run.ray_address)}")
        else:
            self.display.phase("starting a local Ray cluster")

    def cluster_started(self) -> None:
        self.log.capture_worker_output()

    def training_started(self, run_dir: str) -> None:
        name = faults.log_file_name("train")
        if is_uri(run_dir):
            local = os.path.join(faults.logs_folder(), f"{self.cfg.run.name if self.cfg else 'run'}-{name}")
            target = Storage(run_dir)
            self.log.open(local, upload=lambda p: target.write_bytes(f"{layout.LOGS_DIR}/{name}", Path(p).read_bytes()))
            self.remote_log = target.path(layout.LOGS_DIR, name)
        else:
            self.log.open(os.path.join(run_dir, layout.LOGS_DIR, name))
        self.log.write_text(f"command: {self.command.text()}\ncwd: {os.getcwd()}\n")

    def shown_log_path(self) -> str | None:
        return self.remote_log or (short_path(self.log.path) if self.log.path else None)

    # -- the end

    def ending(self) -> Ending:
        """How the job runner (terminal/runner.py) ends a training job on this terminal."""
        return Ending(finished=self.closing_lines, interrupted=self.interrupted, failed=self.failed)

    def _stop_ray(self) -> None:
        """Stop forwarding (and a local cluster) so nothing Ray prints follows the summary."""
        stop_ray()

    def closing_lines(self, summary: dict) -> list[str]:
        """The closing table, where the run lives and the next command (the runner prints
        them, then the JSON line: stdout, last)."""
        self._stop_ray()
        self.log.release_worker_output()
        metrics = Storage(summary["run_dir"]).read_json_or_none(layout.METRICS_FILE) or {}
        lines = ["", *summary_table(metrics), ""]
        lines += where_lines(summary, self.shown_log_path(), time.time() - self.started)
        lines.append(f"next     {self.next_command(summary)}")
        self.log.write_text("\n".join(lines))
        self.log.close()
        return lines

    def next_command(self, summary: dict) -> str:
        """Label with this adapter: the same config and model overrides, the run's data,
        a submission file."""
        cfg = self.cfg
        parts = [self.command.sibling("label")]
        if self.command.config and self.command.config != "demo":
            parts += ["--config", self.command.config]
        data = (cfg.data.validation_path or cfg.data.train_path) if cfg else ""
        run_dir = short_path(summary["run_dir"])
        parts += [
            "--input",
            short_path(data) if data else "YOUR_DATA.csv",
            "--output",
            f"{run_dir}-labels",
            "--adapter",
            short_path(summary["adapter"]),
        ]
        parts += [o for o in self.command.overrides if o.startswith(_CARRIED_PREFIXES)]
        parts.append("label.write_submission=true")
        return " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts))

    def interrupted(self, sig: signal.Signals, err: BaseException) -> str:
        """The line for a run a signal stopped. Ray stops first, so the checkpoint named is
        the one Ray Train registered last (what a rerun restores), never one still being
        written."""
        self._stop_ray()
        text = interrupted_line(
            sig, run_dir=self.run_dir, command=self.command, save_every=_save_every(self.cfg), at_step=self.display.last_step
        )
        self.log.write_text("".join(traceback.format_exception(err)) + text)
        self.log.release_worker_output()
        self.log.close()
        return text

    def failed(self, err: BaseException) -> tuple[int, str] | None:
        """(exit code, text) for a failure this terminal understands (a user error, a worker's
        exception, Ray or a worker dying), also written to the log; None for any other (a
        bug: the runner's line names the trace's file)."""
        explained = explain(
            err,
            run_dir=self.run_dir,
            command=self.command,
            log_path=self.shown_log_path(),
            save_every=_save_every(self.cfg),
            at_step=self.display.last_step,
        )
        if explained is None:
            self.log.write_text("".join(traceback.format_exception(err)))
            self._stop_ray()
            self.log.release_worker_output()
            self.log.close()
            return None
        code, text, details = explained
        if details:
            self.log.write_text(details)
        self.log.write_text(text)
        self._stop_ray()
        self.log.release_worker_output()
        self.log.close()
        return code, text


def _save_every(cfg: ExperimentConfig | None) -> int | None:
    if cfg is None:
        return None
    return cfg.train.save_steps or cfg.train.eval_steps or None


# ============================================================================ the table


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def summary_table(metrics: dict) -> list[str]:
    """Zero-shot against fine-tuned: accuracy and macro-F1 overall and per language, ECE
    (and the calibrated ECE when metrics.json has a `calibration` section)."""
    zs, ft = metrics.get("zero_shot") or {}, metrics.get("fine_tuned") or {}
    if not zs and not ft:
        return ["no validation rows: nothing was scored"]
    rows: list[tuple[str, Any, Any, Any, Any, Any]] = [
        ("all", (ft or zs).get("n"), zs.get("accuracy"), zs.get("macro_f1"), ft.get("accuracy"), ft.get("macro_f1"))
    ]
    langs = sorted(
        set(zs.get("per_language") or {}) | set(ft.get("per_language") or {}),
        key=lambda lang: -((ft.get("per_language") or zs.get("per_language") or {}).get(lang, {}).get("n") or 0),
    )
    for lang in langs:
        z, f = (zs.get("per_language") or {}).get(lang, {}), (ft.get("per_language") or {}).get(lang, {})
        rows.append((f"  {lang}", (f or z).get("n"), z.get("accuracy"), z.get("macro_f1"), f.get("accuracy"), f.get("macro_f1")))
    width = max(12, *(len(r[0]) for r in rows))
    out = [
        f"{'validation':<{width}} {'rows':>5}  {'zero-shot':^19}  {'fine-tuned':^19}",
        f"{'':<{width}} {'':>5}  {'accuracy':>9} {'macro-F1':>9}  {'accuracy':>9} {'macro-F1':>9}",
    ]
    verdicts = {f"  {c['lang']}": c.get("verdict") for c in metrics.get("languages") or []}
    for name, n, za, zf, fa, ff in rows:
        mark = verdicts.get(name) if verdicts.get(name) in ("worse", "lower, within noise") else ""
        out.append(
            f"{name:<{width}} {'' if n is None else n:>5}  {_num(za):>9} {_num(zf):>9}  {_num(fa):>9} {_num(ff):>9}  {mark}"
        )
    # One ECE, defined once (train/evaluation.py calibrate_scores): fine_tuned.ece is the
    # model's own; the calibrated one is measured out of fold.
    calibration = metrics.get("calibration") or {}
    if zs.get("ece") is not None or ft.get("ece") is not None:
        out.append(f"{'ECE':<{width}} {'':>5}  {_num(zs.get('ece')):>9} {'':>9}  {_num(ft.get('ece')):>9}  the model's own")
    if calibration:
        if calibration.get("applied", True) and ft.get("ece_calibrated") is not None:
            temperature = calibration.get("temperature")
            note = f"temperature {temperature:.2f}, out of fold" if temperature is not None else "out of fold"
            out.append(f"{'  calibrated':<{width}} {'':>5}  {'':>9} {'':>9}  {_num(ft['ece_calibrated']):>9}  {note}")
        else:
            out.append(
                f"{'  calibrated':<{width}} {'':>5}  {'':>9} {'':>9}  {'–':>9}  not applied: no temperature lowers the out-of-fold NLL"
            )
    certified = [c for c in (metrics.get("risk_control") or {}).get("certified", []) if c.get("threshold") is not None]
    if certified:
        delta = metrics["risk_control"]["delta"]
        shown = ", ".join(f"error <= {c['max_error']:g}: {c['coverage']:.0%} of rows" for c in certified)
        out.append(f"accepted with a guaranteed error (validation, failure probability {delta:g}): {shown}")
    return [line.rstrip() for line in out]


def where_lines(summary: dict, log_path: str | None, seconds: float) -> list[str]:
    steps = summary.get("steps")
    resumed = summary.get("resumed_from_step")
    how = f"{steps} steps" if steps is not None else "trained"
    if resumed:
        how += f", resumed at step {resumed}"
    lines = [
        f"run      {short_path(summary['run_dir'])}  ({how}, {format_duration(seconds)})",
        f"adapter  {short_path(summary['adapter'])}",
    ]
    if log_path:
        lines.append(f"log      {log_path}")
    return lines


# ============================================================================ failures


def _one_line(text: Any) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return "; ".join(lines) if len(lines) <= 3 else lines[0]


def _resume_hint(run_dir: str | None, save_every: int | None) -> tuple[str, int | None]:
    saved = last_checkpoint(run_dir) if run_dir else None
    if saved:
        step, path = saved
        return f"the last checkpoint is step {step} ({short_path(path)}); rerunning the same command resumes from it", step
    every = f" (one is saved every {save_every} steps)" if save_every else ""
    return f"no checkpoint was saved yet{every}: rerunning the same command starts over", None


def _is_user_error(err: BaseException) -> bool:
    return isinstance(err, UserError) and not err.keeps_trace


def explain(
    err: BaseException,
    *,
    run_dir: str | None,
    command: CommandLine,
    log_path: str | None,
    save_every: int | None = None,
    at_step: tuple[int, int] | None = None,
) -> tuple[int, str, str | None] | None:
    """(exit code, what to print, details for the log) for a failure; None for one that is
    not understood (a bug) or whose trace is worth a file (errors.UserError.keeps_trace)."""
    if _is_user_error(err):
        return 1, f"error: {_one_line(err)}", None
    if isinstance(err, KeyboardInterrupt):
        return (
            130,
            interrupted_line(signal.SIGINT, run_dir=run_dir, command=command, save_every=save_every, at_step=at_step),
            None,
        )
    cause, trace = _worker_exception(err)
    where = f" (traceback: {log_path})" if log_path else ""
    if cause is not None:
        if _is_user_error(cause):
            return 1, f"error: {_one_line(cause)}{where}", trace
        hint, step = _resume_hint(run_dir, save_every) if run_dir else ("", None)
        resume = f"; {hint}" if step is not None else ""
        return 1, f"error: the training worker raised {type(cause).__name__}: {_one_line(cause)}{where}{resume}", trace
    if not _is_ray_failure(err):
        return None
    hint, _ = _resume_hint(run_dir, save_every)
    at = f" at step {at_step[0]} of {at_step[1]}" if at_step else ""
    lines = [
        f"Training stopped{at}: {_what_died(err)}.",
        f"{hint[0].upper()}{hint[1:]}:",
        f"    {command.text()}",
    ]
    if log_path:
        lines.append(f"Everything Ray and the workers printed is in {log_path}")
    return 1, "\n".join(lines), "".join(traceback.format_exception(err))


def interrupted_line(
    sig: signal.Signals,
    *,
    run_dir: str | None,
    command: CommandLine,
    save_every: int | None = None,
    at_step: tuple[int, int] | None = None,
) -> str:
    """One line: what stopped (the signal, the step), the checkpoint a rerun resumes from
    (Ray Train's registered one: a checkpoint folder written but not registered is not
    named, since a rerun would not use it) and the command."""
    at = f" at step {at_step[0]} of {at_step[1]}" if at_step else ""
    saved = last_checkpoint(run_dir) if run_dir else None
    if saved:
        step, path = saved
        kept = f"the last checkpoint is step {step} ({short_path(path)}); rerun the same command to resume from it"
    else:
        every = f" (one is saved every {save_every} steps)" if save_every else ""
        kept = f"no checkpoint was saved yet{every}; rerun the same command to start over"
    return f"Training interrupted by {sig.name}{at}: {kept}: {command.text()}"


def _worker_exception(err: BaseException) -> tuple[BaseException | None, str | None]:
    """The exception the training function raised on a worker (rank 0 first), if that is
    what failed the run: `ray.train.WorkerGroupError.worker_failures` holds it as raised
    (its traceback is in the worker's output, hence the log), or one of Ray's own errors
    for a worker that died."""
    failures = getattr(err, "worker_failures", None)
    if not isinstance(failures, dict):
        return None, None
    for rank in sorted(failures):
        failure = failures[rank]
        if isinstance(failure, BaseException) and type(failure).__module__.split(".")[0] != "ray":
            return failure, str(err)
    return None, None


def _is_ray_failure(err: BaseException) -> bool:
    try:
        import ray.exceptions
        import ray.train
    except ImportError:
        return False
    return isinstance(err, (ray.train.TrainingFailedError, ray.exceptions.RayError, ConnectionError))


def _reason(text: str) -> str:
    """The first sentence of a Ray error, without actor / node ids."""
    first = _one_line(text).split(". ")[0]
    first = re.sub(r"\b[0-9a-f]{16,}\b\s*", "", first).replace("  ", " ").strip()
    return first if len(first) <= 120 else first[:117].rsplit(" ", 1)[0] + "..."


def _what_died(err: BaseException) -> str:
    import ray.exceptions as ray_errors

    failures = getattr(err, "worker_failures", None)
    inner = next(iter(failures.values())) if isinstance(failures, dict) and failures else None
    inner = inner or getattr(err, "controller_failure", None) or err
    text = str(inner)
    low = text.lower()
    if "placement group" in low and "removed" in low:
        return "the Ray cluster's processes for this run were ended (its placement group was removed)"
    if isinstance(failures, dict) and failures:
        return f"a training worker process died ({_reason(text)})"
    if isinstance(inner, (ray_errors.ActorDiedError, ray_errors.ActorUnavailableError, ray_errors.RayActorError)):
        return f"the Ray cluster's processes were ended or crashed ({_reason(text)})"
    return f"the Ray cluster failed or the connection to it was lost ({_reason(text)})"
