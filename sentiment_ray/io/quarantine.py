"""The one quarantine format: a JSON line per bad row with where it was and why.

    {"file": ".../train.csv", "row": 12, "line": 14, "reason": "unknown label ('maybe'; ...)",
     "kind": "unknown label", "values": {"sentence": "...", "label": "maybe"}}

`values` holds the row's raw values (undecodable bytes as \\x escapes; a malformed row's raw
text under `_raw`). Training streams entries into one file (`QuarantineWriter`); the
labeller writes one shard per work unit (`to_jsonl`) and the driver concatenates them in
input order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sentiment_ray.io.storage import Storage
from sentiment_ray.io.values import printable, reason_kind

RAW_KEY = "_raw"


def entry(file: str, row: int, line: int | None, reason: str, values: dict[str, Any], raw: Any = None) -> dict[str, Any]:
    shown = {k: printable(v) for k, v in values.items()}
    if raw is not None:
        shown[RAW_KEY] = printable(raw)
    return {"file": file, "row": row, "line": line, "reason": reason, "kind": reason_kind(reason), "values": shown}


def to_jsonl(entries: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")


class QuarantineWriter:
    """Streams entries to one JSON-lines file (local or URI). The file appears when the
    writer closes (atomically), even empty: it always reflects this load only."""

    def __init__(self, path: str):
        self.path = path
        folder, _, name = path.rstrip("/").rpartition("/")
        self._storage = Storage(folder or ".")
        self._context = self._storage.atomic_writer(name)
        self._stream = self._context.__enter__()
        self.by_kind: Counter[str] = Counter()

    def write(self, entries: Sequence[dict[str, Any]]) -> None:
        if entries:
            self._stream.write(to_jsonl(entries))
            self.by_kind.update(e["kind"] for e in entries)

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def close(self) -> None:
        """Commit the file, also after an error: the rows quarantined so far explain it."""
        self._context.__exit__(None, None, None)
