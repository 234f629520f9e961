"""A failed job's last words: one line naming what failed and why, the full trace in a log file.

    try:
        summary = run()
    except Exception as err:
        print(f"error: {faults.report(err, 'label')}", file=sys.stderr)   # exit 1

`report` writes the traceback (with its causes, and the traceback an actor or a training
worker sent along) to `<cache>/logs/<command>-<UTC time>-<pid>.log` (the cache folder of
models.cache_dir: SENTIMENT_RAY_CACHE, else ~/.cache/sentiment-ray; the temp folder if that
cannot be written) and returns `<what failed>: <cause> (full trace: <log>)`. For an error
that came through Ray (an actor's, a Train worker's: Ray hands over the remote traceback as
text) the line is the remote error's own last line, not Ray's wrapper.

Pure: the standard library only.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import traceback

from sentiment_ray.io.uris import error_cause, redact
from sentiment_ray.models import cache_dir

# Ray's wrappers around the error that actually happened in a worker.
_WRAPPERS = {
    "RayTaskError", "UserCodeException", "RayActorError", "ActorDiedError", "TrainingFailedError",
    "WorkerGroupError", "RayError", "TaskError", "ObjectRefStreamEndOfStreamError", "StopIteration",
}
# `module.Type: message` at the start of a line of a traceback's text.
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?P<type>[A-Za-z_]\w*(?:Error|Exception|Exit|Fault|Held|Lost|Interrupt)): (?P<msg>.+)$")


def _is_ray_error(err: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(err).__mro__)


def remote_error_line(text: str) -> str | None:
    """The first `Type: message` line of a traceback's text that is not one of Ray's
    wrappers (the root cause comes first in a chained traceback), or None."""
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        match = _ERROR_LINE.match(line)
        if match and match.group("type") not in _WRAPPERS:
            return f"{match.group('type')}: {match.group('msg')}"
    return None


def one_line(err: BaseException) -> str:
    """What failed and why, on one line."""
    if _is_ray_error(err):
        remote = remote_error_line(str(err))
        if remote:
            return redact(remote)
    if isinstance(err, OSError):
        where = getattr(err, "filename", None)
        cause = error_cause(err)
        return redact(f"{where}: {cause}" if where else f"{type(err).__name__}: {cause}")
    text = " ".join(str(err).split()) or type(err).__name__
    first = text if len(text) <= 500 else text[:500] + " ..."
    return redact(first if ":" in first else f"{type(err).__name__}: {first}")


def write_trace(err: BaseException, command: str) -> str | None:
    """Write the full traceback of `err` into a new log file; its path, or None."""
    text = redact("".join(traceback.format_exception(err)))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', command) or 'job'}-{stamp}-{os.getpid()}.log"
    for folder in (os.path.join(cache_dir(), "logs"), tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def report(err: BaseException, command: str) -> str:
    """`one_line(err)` plus where its full trace went."""
    log = write_trace(err, command)
    return f"{one_line(err)} (full trace: {log})" if log else f"{one_line(err)} (no trace file could be written)"
