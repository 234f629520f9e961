"""The one error model: what a job's end makes of an exception.

A `UserError` is a mistake or a state the user can act on from its message alone (bad data,
a config field, a held lock, a changed run, a missing model folder): the job ends with
`error: <message>` and exit code 1, and no trace file, since the trace would only show
where this package noticed. Any other exception is a fault (a bug, a library's failure):
one line naming its trace's log file (terminal/faults.py).

Each user error class keeps the built-in base that code catches it by (`ValueError`,
`RuntimeError`, `FileNotFoundError`) beside `UserError`.

Pure: no imports, so every module can raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message is the whole story: printed as `error: <message>`, exit 1.

    `keeps_trace`: the message is still the whole story for the user, but the trace is
    worth keeping for a report (an I/O failure deep in a writer): the line names its log."""

    keeps_trace: bool = False
