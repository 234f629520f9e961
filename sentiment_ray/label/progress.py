"""Progress of a labelling run that a person can follow: rows labelled of the total, rows/s,
ETA and bad rows so far, updated while a unit is still being labelled.

Each actor reports, per work unit, how many of its rows it has read (labelled or
quarantined) to one small Ray actor (`ProgressBoard`) after every piece it scores. The board
keeps the largest count per unit, so a unit redone after an actor died never counts twice:
the total reaches the input's row count exactly once per row. The driver polls the board and
shows it: on a terminal in training's tqdm bar (console.Display), every couple of seconds; in
a log as a line every ~30 s.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

from sentiment_ray.terminal.console import Display, format_duration

TTY_EVERY_S = 2.0
LOG_EVERY_S = 30.0


class ProgressBoard:
    """Rows read per unit (the largest count reported), and bad rows among them."""

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}
        self._bad: dict[str, int] = {}

    def update(self, unit_id: str, rows: int, bad: int) -> None:
        if rows >= self._rows.get(unit_id, -1):
            self._rows[unit_id] = rows
            self._bad[unit_id] = bad

    def totals(self) -> tuple[int, int]:
        return sum(self._rows.values()), sum(self._bad.values())


def start_board():
    """The board as a Ray actor (no CPU reserved: it only adds numbers)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


@dataclass
class Snapshot:
    done: int
    total: int
    bad: int
    rate: float | None
    eta_s: float | None

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = f"{self.rate:,.0f} rows/s" if self.rate else "-- rows/s"
        eta = format_duration(self.eta_s)  # the training bar's format: 1m45s
        return f"labelling {self.done:,} / {self.total:,} rows ({pct:.0f}%)  {rate}  ETA {eta}  bad rows {self.bad:,}"


class ProgressView:
    """Draws the board's totals for a person while the run goes on (a thread): on a terminal
    the same tqdm bar as training's steps (console.Display), counting rows, with the bad rows
    beside it; in a log a line every LOG_EVERY_S."""

    def __init__(self, board: Any, total_rows: int, done_before: int, stream: TextIO | None = None):
        self.board = board
        self.total = total_rows
        self.done_before = done_before
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = TTY_EVERY_S if self.tty else LOG_EVERY_S
        self.display = Display(self.stream, tty=True) if self.tty else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="label-progress", daemon=True)
        self._started = time.monotonic()
        self.last: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        import ray

        rows, bad = ray.get(self.board.totals.remote(), timeout=10)
        done = min(self.total, self.done_before + rows)
        elapsed = time.monotonic() - self._started
        rate = rows / elapsed if rows and elapsed > 0 else None
        eta = (self.total - done) / rate if rate else None
        return Snapshot(done, self.total, bad, rate, eta)

    def _draw(self, final: bool = False) -> None:
        try:
            self.last = self.snapshot()
        except Exception:  # noqa: BLE001 - progress must never stop a run
            return
        if self.display is not None:
            self._draw_bar(self.last, final)
            return
        self.stream.write(self.last.line() + "\n")
        self.stream.flush()

    def _draw_bar(self, snapshot: Snapshot, final: bool) -> None:
        if self.display.last_step is None:
            self.display.progress_start(snapshot.total, initial=self.done_before, unit="row")
        self.display.progress_postfix(f"bad rows {snapshot.bad:,}")
        self.display.progress(snapshot.done, snapshot.total)
        if final:
            self.display.close_progress()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._draw()

    def __enter__(self) -> ProgressView:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._draw(final=True)
