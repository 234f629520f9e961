"""How every command ends: the one job runner.

    return run_job("export", lambda: export_merged(cfg, ...), Ending(finished=export_lines))

A job ends in one of four ways, the same for train, tune, label, eval, export and benchmark:

- done: a short human summary on the terminal (what was done, where it is, warnings, the
  next command), then the summary as one JSON line, the last line on stdout (exit 0);
- a `UserError` (errors.py): `error: <message>` (exit 1);
- any other exception: `error: <what failed>: <cause> (full trace: <log>)`, the traceback in
  a log file named by `log_file_name` (exit 1);
- SIGINT / SIGTERM (faults.on_signals): one line saying what stopped, what is safely
  written and the command that resumes (exit 128 + the signal's number).

What differs between jobs is only what their `Ending` says: the summary's lines, the
signal's line, and (training) what a failure of Ray or a worker means.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sentiment_ray.errors import UserError
from sentiment_ray.terminal import faults
from sentiment_ray.terminal.console import Display


@dataclass
class Ending:
    """What a job says at its end; every part optional.

    finished:    the summary -> the human lines shown before the JSON line
    interrupted: (signal, the exception it surfaced as) -> the one line for a stopped job
    failed:      an exception -> (exit code, text), or None for the runner's own line
    closed:      called once whichever way the job ended, before anything is printed
                 (stops Ray, so nothing it prints follows the last line)
    shown_as_json: the summary -> what the JSON line holds (default: all of it)
    """

    finished: Callable[[dict], list[str]] | None = None
    interrupted: Callable[[signal.Signals, BaseException], str] | None = None
    failed: Callable[[BaseException], tuple[int, str] | None] | None = None
    closed: Callable[[], None] | None = None
    shown_as_json: Callable[[dict], dict] | None = None


def error_line(err: BaseException, command: str) -> str:
    """`error: <message>` for a user error; for a fault (or a user error whose trace is worth
    keeping) the one line naming the log file that holds its trace."""
    if isinstance(err, UserError) and not err.keeps_trace:
        return f"error: {err}"
    return f"error: {faults.report(err, command)}"


def _last_words(err: BaseException, command: str, headline: str | None = None) -> str:
    """The job's `error:` line, whatever happens while it is written (a trace that cannot be
    formatted still leaves the line)."""
    try:
        return f"error: {faults.report(err, command, headline)}" if headline else error_line(err, command)
    except Exception as fault:  # noqa: BLE001 - the last line must come out
        return f"error: {command} failed: {type(err).__name__} (and its report failed: {type(fault).__name__}: {fault})"


def summary_json(summary: dict) -> str:
    return json.dumps(summary, ensure_ascii=False, default=str)


def run_job(command: str, job: Callable[[], dict], ending: Ending | None = None, *, display: Display | None = None) -> int:
    """Run `job` under the signal handling of `faults.on_signals`; end it the one way (module
    docstring). Returns the exit code. A SystemExit inside the job that no signal caused is a
    library ending the process (Ray's handlers call sys.exit): it too is one line. Only a
    second KeyboardInterrupt outside the job is re-raised."""
    ending = ending or Ending()
    display = display or Display()
    try:
        with faults.on_signals():
            summary = job()
            lines = ending.finished(summary) if ending.finished else []
    except BaseException as err:  # noqa: BLE001 - every way a job stops ends here, in one line
        with contextlib.suppress(Exception):  # the job's own failure is the line to print
            _close(ending)
        stopped_by = faults.interrupted() or (signal.SIGINT if isinstance(err, KeyboardInterrupt) else None)
        if stopped_by is not None:
            # Whatever Ray raised while its processes went down with the signal: the job was
            # interrupted, and says so.
            text = ending.interrupted(stopped_by, err) if ending.interrupted else f"{command} interrupted by {stopped_by.name}"
            display.error(text)
            return faults.exit_code(stopped_by)
        if isinstance(err, SystemExit):
            code = err.code if isinstance(err.code, int) and err.code else 1
            display.error(_last_words(err, command, f"{command} was ended by a library (exit {code}) before it finished"))
            return code
        if not isinstance(err, Exception):
            raise
        try:
            explained = ending.failed(err) if ending.failed else None
        except Exception as fault:  # noqa: BLE001 - explaining failed: the fault's own line
            explained = (1, _last_words(fault, command))
        code, text = explained or (1, _last_words(err, command))
        display.error(text)
        return code
    _close(ending)
    for line in lines:
        display.info(line)
    print(summary_json(ending.shown_as_json(summary) if ending.shown_as_json else summary), flush=True)
    return 0


def _close(ending: Ending) -> None:
    if ending.closed is None:
        return
    closed, ending.closed = ending.closed, None
    closed()


def stop_ray() -> None:
    """Stop Ray if this process started or joined it: its log forwarding ends, so nothing
    it prints follows the job's last line."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
