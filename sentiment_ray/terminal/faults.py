"""A failed job's last words: one line naming what failed and why, the full trace in a log file.

    try:
        summary = run()
    except Exception as err:
        print(f"error: {faults.report(err, 'label')}", file=sys.stderr)   # exit 1

`report` writes the traceback (with its causes, and the traceback an actor or a training
worker sent along) to `<cache>/logs/<command>-<UTC time>-<pid>.log` (`log_file_name`, the
name of every log a job writes; the cache folder of
models.cache_dir: SENTIMENT_RAY_CACHE, else ~/.cache/sentiment-ray; the temp folder if that
cannot be written) and returns `<what failed>: <cause> (full trace: <log>)`. For an error
that came through Ray (an actor's, a Train worker's: Ray hands over the remote traceback as
text) the line is the remote error's own last line, not Ray's wrapper.

A signal is not a fault: `on_signals()` makes SIGINT (Ctrl-C) and SIGTERM stop a job the
same way, as a KeyboardInterrupt in its main thread, and remembers which one came
(`interrupted()`), so the job ends with its own line (what stopped, what is safely written,
the command that resumes) and exit code 128 + the signal's number, whatever Ray raised
while its processes went down with it.

Pure: the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
import traceback

from sentiment_ray.io.uris import error_cause, redact
from sentiment_ray.models import cache_dir

# Ray's wrappers around the error that actually happened in a worker.
_WRAPPERS = {
    "RayTaskError",
    "UserCodeException",
    "RayActorError",
    "ActorDiedError",
    "TrainingFailedError",
    "WorkerGroupError",
    "RayError",
    "TaskError",
    "ObjectRefStreamEndOfStreamError",
    "StopIteration",
}
# `module.Type: message` at the start of a line of a traceback's text.
_ERROR_LINE = re.compile(
    r"^(?:[A-Za-z_][\w]*\.)*(?P<type>[A-Za-z_]\w*(?:Error|Exception|Exit|Fault|Held|Lost|Interrupt)): (?P<msg>.+)$"
)


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


def log_file_name(command: str) -> str:
    """The name of a job's log file, the one way: `<command>-<UTC date-time>-<pid>.log`
    (sorted by time within a command; two jobs started in the same second still differ)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', command) or 'job'}-{stamp}-{os.getpid()}.log"


def logs_folder() -> str:
    """Where a job's logs go when it has no run folder of its own: `<cache>/logs`."""
    return os.path.join(cache_dir(), "logs")


def write_trace(err: BaseException, command: str) -> str | None:
    """Write the full traceback of `err` into a new log file; its path, or None."""
    text = redact("".join(traceback.format_exception(err)))
    name = log_file_name(command)
    for folder in (logs_folder(), tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def report(err: BaseException, command: str, headline: str | None = None) -> str:
    """`headline` (default `one_line(err)`) plus where the full trace went."""
    log = write_trace(err, command)
    headline = headline or one_line(err)
    return f"{headline} (full trace: {log})" if log else f"{headline} (no trace file could be written)"


# ----------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: signal.Signals | None = None
_active = False
_wakeup: socket.socket | None = None  # the read end of the signal wakeup socket pair


def _stop(signum, frame) -> None:  # noqa: ARG001 - a signal handler's signature
    global _received
    if _received is None:
        _received = signal.Signals(signum)
        raise KeyboardInterrupt
    # A second signal while the job stops: it is stopping already, and its line still comes.


def _drain() -> None:
    """Note a stop signal the wakeup socket saw (Python's C-level handler writes every
    caught signal's number there, whichever Python handler then runs, or before it runs)."""
    global _received
    if _wakeup is None:
        return
    try:
        while data := _wakeup.recv(512):
            for number in data:
                if _received is None and number in {int(sig) for sig in STOP_SIGNALS}:
                    _received = signal.Signals(number)
    except (BlockingIOError, OSError):
        pass


@contextlib.contextmanager
def on_signals():
    """While a job runs: SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, once
    (a second one while it stops is ignored); `interrupted()` says which came, then and
    afterwards.

    Libraries replace the handlers: `ray.init` installs its own for SIGTERM (an immediate
    SystemExit; `cluster.connect` calls `keep_signal_handlers()` after it), and Ray Train's
    `fit()` one for SIGINT that aborts the run (whose end is then a SystemExit or a Ray
    error). And when Ctrl-C signals the terminal's process group, the local cluster's
    processes die with the driver, which may see Ray's SystemExit before any Python handler
    has run. So the signal is also noted through `signal.set_wakeup_fd`, which Python's
    C-level handler writes to on arrival, whichever Python handler is installed. The previous
    handlers (and wakeup fd) come back afterwards."""
    global _received, _active, _wakeup
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _received, _active, _wakeup = None, True, reader
    try:
        keep_signal_handlers()
        yield
    finally:
        _drain()
        _active, _wakeup = False, None
        signal.set_wakeup_fd(previous_fd)
        reader.close()
        writer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def keep_signal_handlers() -> None:
    """Put `on_signals`' handlers back (after a library replaced them), while it is active."""
    if _active and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop)


def interrupted() -> signal.Signals | None:
    """The signal that stopped the job (SIGINT, SIGTERM), or None."""
    _drain()
    return _received


def exit_code(sig: signal.Signals) -> int:
    """The shell's convention for a job ended by a signal: 128 + its number (130 for SIGINT)."""
    return 128 + int(sig)
