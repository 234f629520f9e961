"""What a person sees in the terminal during a job, and where everything else goes.

Quiet by default: a job announces its phases, draws one progress bar, prints the warnings
that matter and ends with its summary; Ray's own messages, the libraries' warnings and the
workers' output go to the run's log file only. `--verbose` (or SENTIMENT_RAY_LOG=debug)
prints all of it as Ray would; the log file is written either way.

    display = Display()
    display.phase("zero-shot scoring 200 rows")
    with RunLog(verbose=False) as log:             # driver logging into the file, quiet terminal
        cluster.connect(...)
        log.capture_worker_output(display)          # after ray.init: worker lines -> file / events
        log.open("/runs/demo/logs/train-20261201-101500.log")

Workers talk to the driver through their ordinary output: `WorkerEvents` prints one line
per event (`EVENT_PREFIX` + JSON), Ray forwards worker output to the driver, and
`WorkerOutput` turns those lines back into events for the `Display` (phases, steps,
warnings) while every line goes to the log file.

Pure at import time: tqdm and ray are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from sentiment_ray import compat
from sentiment_ray.io.uris import redact

LOG_ENV = "SENTIMENT_RAY_LOG"
EVENT_PREFIX = "[sentiment-ray event] "
# The package's own loggers: their warnings reach the terminal; everything else goes to the log.
PACKAGE_LOGGER = "sentiment_ray"


def verbose_requested(flag: bool = False) -> bool:
    """`--verbose`, or SENTIMENT_RAY_LOG=debug in the environment."""
    return bool(flag) or os.environ.get(LOG_ENV, "").strip().lower() in ("debug", "verbose", "all")


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def hide_library_progress_bars() -> None:
    """transformers' `Loading weights` and huggingface_hub's `Writing model shards` bars: a
    job's terminal shows its own phases instead."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


# ============================================================================ events


def encode_event(kind: str, **fields: Any) -> str:
    return EVENT_PREFIX + json.dumps({"kind": kind, **fields}, ensure_ascii=False, default=str)


def parse_event(line: str) -> dict | None:
    """The event a worker line carries, or None (Ray may prefix or colour the line)."""
    at = line.find(EVENT_PREFIX)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(EVENT_PREFIX) :].strip())
    except ValueError:
        return None
    return event if isinstance(event, dict) and "kind" in event else None


class WorkerEvents:
    """The worker side: events as stdout lines (a no-op when `enabled` is false: other
    ranks, Tune trials, runs started without a terminal display)."""

    def __init__(self, enabled: bool, *, min_step_interval_s: float = 0.5):
        self.enabled = enabled
        self.min_step_interval_s = min_step_interval_s
        self._last_step_at: float | None = None  # None: no step sent yet (the first always goes)

    def emit(self, kind: str, **fields: Any) -> None:
        if self.enabled:
            print(encode_event(kind, **fields), flush=True)

    def phase(self, text: str) -> None:
        self.emit("phase", text=text)

    def warning(self, text: str) -> None:
        self.emit("warning", text=text)

    def progress_start(self, total: int, initial: int = 0, unit: str = "step") -> None:
        self.emit("progress_start", total=total, initial=initial, unit=unit)

    def step(self, step: int, total: int, loss: float | None = None, *, force: bool = False) -> None:
        """At most one line per `min_step_interval_s` (and always the last step)."""
        now = time.monotonic()
        recent = self._last_step_at is not None and now - self._last_step_at < self.min_step_interval_s
        if not force and step < total and recent:
            return
        self._last_step_at = now
        self.emit("step", step=step, total=total, loss=loss)

    def note(self, text: str) -> None:
        """A line printed under the progress bar (a checkpoint was saved ...)."""
        self.emit("note", text=text)

    def progress_end(self) -> None:
        self.emit("progress_end")

    def forward_warnings(self, logger_name: str = PACKAGE_LOGGER) -> None:
        """Send this package's WARNING+ log records as warning events too."""
        if not self.enabled:
            return
        logger = logging.getLogger(logger_name)
        if not any(isinstance(h, _EventHandler) for h in logger.handlers):
            logger.addHandler(_EventHandler(self))


class _EventHandler(logging.Handler):
    def __init__(self, events: WorkerEvents):
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.warning(record.getMessage())
        except Exception:  # noqa: BLE001 - never let reporting break a run
            pass


# ============================================================================ display


class Display:
    """Phases, warnings and one progress bar on stderr. On a terminal the bar is tqdm's;
    elsewhere (job logs, pipes, tests) a line at every tenth of the steps, and the last."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.RLock()
        self._bar = None
        self._progress: dict[str, Any] | None = None
        self.last_step: tuple[int, int] | None = None  # (step, total) of the last progress update

    # -- lines

    def _write(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.clear()
            print(text, file=self.stream, flush=True)
            if self._bar is not None:
                self._bar.refresh()

    def phase(self, text: str) -> None:
        self._write(text)

    def info(self, text: str) -> None:
        self._write(text)

    def note(self, text: str) -> None:
        self._write(f"  {text}")

    def warning(self, text: str) -> None:
        self._write(f"warning: {text}")

    def error(self, text: str) -> None:
        self.close_progress()
        self._write(text)

    # -- progress

    def progress_start(self, total: int, initial: int = 0, unit: str = "step") -> None:
        with self._lock:
            self.close_progress()
            self._progress = {
                "total": max(int(total), 1),
                "initial": int(initial),
                "unit": unit,
                "started": time.monotonic(),
                "last_line_step": int(initial),
                "step": int(initial),
                "loss": None,
                "checkpoint": None,
            }
            if self.tty:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=self._progress["total"],
                    initial=self._progress["initial"],
                    file=self.stream,
                    unit=unit,
                    dynamic_ncols=True,
                    leave=True,
                    # tqdm puts ", " before a postfix: `[00:45<02:15, 3.00s/step, loss 0.6120, checkpoint 15]`;
                    # rows come by the thousand: their rate reads as rows/s
                    bar_format="  {unit} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, "
                    + ("{rate_fmt}" if unit == "row" else "{rate_inv_fmt}")
                    + "{postfix}]",
                )
                self._bar.unit = unit

    def progress(self, step: int, total: int | None = None, loss: float | None = None) -> None:
        with self._lock:
            if self._progress is None:
                self.progress_start(total or step, 0)
            p = self._progress
            if total:
                p["total"] = int(total)
            previous, p["step"] = p["step"], int(step)
            p.setdefault("first", (time.monotonic(), p["step"]))  # the rate counts from the first step seen
            self.last_step = (p["step"], p["total"])
            if loss is not None:
                p["loss"] = loss
            if self._bar is not None:
                if self._bar.total != p["total"]:
                    self._bar.total = p["total"]
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.update(max(0, p["step"] - previous))
                return
            every = max(1, p["total"] // 10)
            crossed = p["step"] // every > p["last_line_step"] // every
            if crossed or p["step"] >= p["total"]:
                p["last_line_step"] = p["step"]
                print(self.progress_line(), file=self.stream, flush=True)

    def checkpoint(self, step: int) -> None:
        """A checkpoint was saved at `step` (shown with the progress: where a rerun resumes)."""
        with self._lock:
            if self._progress is not None:
                self._progress["checkpoint"] = int(step)
                if self._bar is not None:
                    self._bar.set_postfix_str(self._postfix())

    def progress_postfix(self, text: str) -> None:
        """Text shown beside the bar (the label job's bad rows)."""
        with self._lock:
            if self._progress is not None:
                self._progress["postfix"] = text

    def _postfix(self) -> str:
        p = self._progress or {}
        parts = [f"loss {p['loss']:.4f}"] if p.get("loss") is not None else []
        if p.get("postfix"):
            parts.append(p["postfix"])
        if p.get("checkpoint"):
            parts.append(f"checkpoint {p['checkpoint']}")
        return ", ".join(parts)

    def progress_line(self) -> str:
        """`  step 15/60  loss 0.6120  2.9 s/step  ETA 2m10s` (the line mode's line)."""
        p = self._progress or {}
        now = time.monotonic()
        elapsed = now - p.get("started", now)
        first_at, first_step = p.get("first", (now, p.get("step", 0)))
        done = p.get("step", 0) - first_step
        per = (now - first_at) / done if done > 0 else None
        remaining = per * (p.get("total", 0) - p.get("step", 0)) if per is not None else None
        parts = [f"  {p.get('unit', 'step')} {p.get('step', 0)}/{p.get('total', 0)}"]
        if p.get("loss") is not None:
            parts.append(f"loss {p['loss']:.4f}")
        if per is not None:
            parts.append(f"{per:.1f} s/{p.get('unit', 'step')}")
        if p.get("checkpoint"):
            parts.append(f"checkpoint {p['checkpoint']}")
        parts.append(
            f"ETA {format_duration(remaining)}" if p.get("step", 0) < p.get("total", 0) else f"took {format_duration(elapsed)}"
        )
        return "  ".join(parts)

    def close_progress(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._progress = None

    # -- events from workers

    def handle_event(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "phase":
            self.close_progress()
            self.phase(str(event.get("text", "")))
        elif kind == "warning":
            self.warning(str(event.get("text", "")))
        elif kind == "note":
            self.note(str(event.get("text", "")))
        elif kind == "progress_start":
            self.progress_start(int(event.get("total") or 1), int(event.get("initial") or 0), str(event.get("unit") or "step"))
        elif kind == "checkpoint":
            self.checkpoint(int(event.get("step") or 0))
        elif kind == "step":
            self.progress(int(event.get("step") or 0), event.get("total"), event.get("loss"))
        elif kind == "progress_end":
            self.close_progress()


# ============================================================================ the log file


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers with handlers of their own: the root, Ray's and Ray Data's (neither propagates).
_RAY_LOGGERS = ("", "ray", "ray.data")


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _Buffer(logging.Handler):
    """Holds the driver's records until the log file is opened."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)


class _LevelPrefix(logging.Formatter):
    """`warning: message`, `error: message`: the form of the job's other terminal lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _TerminalFilter(logging.Filter):
    """Quiet mode on the terminal: only this package's warnings (and worse)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(PACKAGE_LOGGER) and record.levelno >= logging.WARNING


class RunLog:
    """A job's complete log: the driver's log records (Ray's, the libraries', this
    package's, Python warnings) and, once `capture_worker_output` is called, every line
    the workers print. Records wait in memory until `open(path)` names the file (so that
    nothing is written for a job that stops before it has a run folder).

    Quiet (the default): the terminal shows this package's warnings only, as `warning: ...`;
    Ray's handlers print nothing. Verbose: the terminal shows what it would without us."""

    def __init__(self, verbose: bool = False, display: Display | None = None):
        self.verbose = verbose
        self.display = display or Display()
        self.path: str | None = None
        self._upload: Callable[[str], None] | None = None
        self._file: TextIO | None = None
        self._lock = threading.Lock()
        self._buffer = _Buffer()
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._silenced: list[tuple[logging.Handler, logging.Filter]] = []
        self._restore_worker_output: Callable[[], None] | None = None
        self._worker_output_terminal = True
        self._terminal_handler: logging.Handler | None = None
        self._saved_levels: list[tuple[logging.Logger, int]] = []

    # -- set-up / tear-down

    def __enter__(self) -> RunLog:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        logging.captureWarnings(True)
        root = logging.getLogger()
        # The root logger, and Ray's and Ray Data's, which do not propagate to it.
        for name in _RAY_LOGGERS:
            logger = logging.getLogger(name)
            self._handlers.append((logger, self._buffer))
            logger.addHandler(self._buffer)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            self._saved_levels.append((root, root.level))
            root.setLevel(logging.INFO)
        package = logging.getLogger(PACKAGE_LOGGER)
        if package.level == logging.NOTSET or package.level > logging.INFO:
            self._saved_levels.append((package, package.level))
            package.setLevel(logging.INFO)
        # This package's records on the terminal: its warnings when quiet, INFO when verbose.
        self._terminal_handler = logging.StreamHandler(self.display.stream)
        if self.verbose:
            self._terminal_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            self._terminal_handler.addFilter(lambda r: r.name.startswith(PACKAGE_LOGGER))
        else:
            self._terminal_handler.setFormatter(_LevelPrefix())
            self._terminal_handler.addFilter(_TerminalFilter())
        package.addHandler(self._terminal_handler)
        self.silence_ray_terminal()

    def before_ray_init(self) -> None:
        """Quiet mode: import ray (it sets up its loggers' handlers on import) and silence
        those handlers before ray.init logs anything."""
        if not self.verbose:
            import ray  # noqa: F401

            self.silence_ray_terminal()

    def silence_ray_terminal(self) -> None:
        """Quiet mode: Ray's own handlers (and a bare root's stream handlers) print nothing;
        their records still reach the log file. Call again after ray.init (it adds handlers)."""
        if self.verbose:
            return
        for name in _RAY_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if handler in (self._buffer, self._terminal_handler) or isinstance(handler, logging.FileHandler):
                    continue
                if isinstance(handler, logging.StreamHandler) and not any(f is _DROP for f in handler.filters):
                    handler.addFilter(_DROP)
                    self._silenced.append((handler, _DROP))

    def open(self, path: str, upload: Callable[[str], None] | None = None) -> str:
        """Start writing the log to the local file `path` (its folder is created); the
        buffered records go first. `upload(path)` is called at close (object-store runs)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with self._lock:
            self._file = open(path, "a", encoding="utf-8", buffering=1)
            self.path, self._upload = path, upload
        handler = logging.StreamHandler(self._file)
        handler.setFormatter(_Redacting(_LOG_FORMAT))
        handler.setLevel(logging.DEBUG)
        for record in self._buffer.records:
            handler.handle(record)
        self._buffer.records.clear()
        swapped = []
        for logger, old in self._handlers:
            if old is self._buffer:
                logger.removeHandler(self._buffer)
                logger.addHandler(handler)
                old = handler
            swapped.append((logger, old))
        self._handlers = swapped
        return path

    def write_text(self, text: str) -> None:
        """Raw text into the log file (worker lines, a traceback); dropped before `open`."""
        with self._lock:
            if self._file is not None:
                self._file.write(redact(text if text.endswith("\n") else text + "\n"))

    def close(self) -> None:
        if self._restore_worker_output is not None:
            # Stop printing worker output on the terminal; late lines still go to the file
            # until the file closes (Ray keeps forwarding until shutdown).
            self._worker_output_terminal = False
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
        self._handlers.clear()
        if self._terminal_handler is not None:
            logging.getLogger(PACKAGE_LOGGER).removeHandler(self._terminal_handler)
            self._terminal_handler = None
        for handler, f in self._silenced:
            handler.removeFilter(f)
        self._silenced.clear()
        for logger, level in self._saved_levels:
            logger.setLevel(level)
        self._saved_levels.clear()
        logging.captureWarnings(False)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        if self._upload is not None and self.path:
            try:
                self._upload(self.path)
            except Exception as err:  # noqa: BLE001 - the log is a convenience, never a failure
                self.display.warning(f"could not upload the log {self.path}: {err}")
            self._upload = None

    # -- worker output

    def capture_worker_output(self) -> None:
        """Take over the printing of worker output Ray forwards to this driver (call after
        ray.init): every line into the log file, events to the display, and in verbose mode
        the other lines printed as Ray prints them."""
        if self._restore_worker_output is not None:
            return
        self._worker_output_terminal = True
        self._restore_worker_output = compat.replace_worker_output_printer(self._on_worker_output)
        self.silence_ray_terminal()

    def release_worker_output(self) -> None:
        """Give the printing back to Ray (the next job in this process, tests)."""
        if self._restore_worker_output is not None:
            self._restore_worker_output()
            self._restore_worker_output = None

    def _on_worker_output(self, batch: dict, ray_printer: Callable[[dict], None] | None) -> None:
        lines = batch.get("lines") or []
        if batch.get("pid") == "autoscaler":
            # The autoscaler monitor's raw status; Ray itself prints only its events.
            if self.verbose and self._worker_output_terminal and ray_printer is not None:
                ray_printer(batch)
            return
        who = batch.get("actor_name") or batch.get("task_name") or ""
        ip = batch.get("ip")
        remote = f", ip={ip}" if ip and ip != batch.get("localhost") else ""
        prefix = f"({who + ' ' if who else ''}pid={batch.get('pid')}{remote}) "
        rest = []
        for line in lines:
            event = parse_event(line)
            if event is not None:
                if self._worker_output_terminal:
                    self.display.handle_event(event)
                continue
            self.write_text(prefix + line)
            rest.append(line)
        if self.verbose and self._worker_output_terminal and rest and ray_printer is not None:
            ray_printer({**batch, "lines": rest})


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_DROP = _DropAll()
