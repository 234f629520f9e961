"""One value at a time: why a value cannot be used, and the string of a usable one (labels
and languages canonical, IDs exactly as written).

Bad-row kinds are the first words of every reason (`unknown label ('maybe'; ...)`), so a
reason can be counted by kind (`reason_kind`). Values arrive as the readers give them: CSV
text exactly as written (undecodable bytes carried as surrogate escapes, so each is reported
on its own row), JSON values, Parquet's Python values, bytes.
"""

from __future__ import annotations

import math
from typing import Any

from sentiment_ray.errors import UserError
from sentiment_ray.io.uris import redact

# Bad-row kinds.
EMPTY_TEXT = "empty text"
MISSING_TEXT = "missing text"
NOT_A_STRING = "text is not a string"
UNDECODABLE = "undecodable bytes"
MISSING_LABEL = "missing label"
UNKNOWN_LABEL = "unknown label"
MISSING_ID = "missing ID"
DUPLICATE_ID = "duplicate ID"
MALFORMED_ROW = "malformed row"


class DataError(UserError, ValueError):
    """Bad input data. The message names the file, the row (and line) and the reason;
    credentials in it (a URI's userinfo, secret env values) are masked."""

    def __init__(self, message: str):
        super().__init__(redact(message))


def where(file: str, row: int | None = None, line: int | None = None) -> str:
    """`file: row 12 (line 14)`: how every message names a row."""
    out = file
    if row is not None:
        out += f": row {row}"
        if line is not None:
            out += f" (line {line})"
    return out


def reason_kind(reason: str) -> str:
    """The bad-row kind a reason starts with: 'unknown label (...)' -> 'unknown label'."""
    return reason.split(" (", 1)[0]


def undecodable_offset(value: str) -> int | None:
    """Byte offset of the first invalid UTF-8 byte carried as a surrogate escape, else None."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return err.start
        return 0  # a lone surrogate from a JSON \ud800 escape: not encodable either


def undecodable_reason(value: str | bytes, column: str | None = None) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
        start = 0
    except UnicodeDecodeError as err:
        start = err.start
    inside = f" in column {column!r}" if column else ""
    snippet = raw[max(0, start - 10) : start + 10]
    return f"{UNDECODABLE} (not valid UTF-8{inside} at byte {start}: {snippet!r})"


def is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_problem(value: Any) -> str | None:
    """None when `value` is usable text, else the reason (the bad-row kind first)."""
    if is_null(value):
        return MISSING_TEXT + " (null)"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return undecodable_reason(value)
    if not isinstance(value, str):
        return f"{NOT_A_STRING} (got {type(value).__name__} {value!r})"
    if undecodable_offset(value) is not None:
        return undecodable_reason(value)
    if not value:
        return EMPTY_TEXT
    if not value.strip():
        return EMPTY_TEXT + " (whitespace only)"
    return None


def as_text(value: Any) -> str:
    """The text of a value `text_problem` accepted (bytes decoded)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _as_string(value: Any) -> str | None:
    """A value as a string: text as written, ints and integral floats without a decimal
    point (IMDB labels 0/1 from Parquet or JSON match label_map keys "0"/"1")."""
    if is_null(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")  # callers check decodability first
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def as_key(value: Any) -> str | None:
    """A label or language value as a comparable string, surrounding whitespace dropped
    (`" Positive"` is the label Positive). Not for IDs: see `id_key`."""
    key = _as_string(value)
    return None if key is None else key.strip()


def value_problem(value: Any, column: str) -> str | None:
    """The reason `value` of `column` is not valid UTF-8 text, or None."""
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return undecodable_reason(value, column)
    if isinstance(value, str) and undecodable_offset(value) is not None:
        return undecodable_reason(value, column)
    return None


def id_problem(value: Any) -> str | None:
    """Why `value` cannot be a row's ID (undecodable, missing, or only whitespace: a blank
    cell, not an identifier), else None."""
    problem = value_problem(value, "ID")
    if problem is not None:
        return problem
    key = _as_string(value)
    if not key:
        return MISSING_ID
    if not key.strip():
        return MISSING_ID + " (whitespace only)"
    return None


def id_key(value: Any) -> str | None:
    """An ID as the string the outputs carry, or None when `id_problem` refuses it.

    Text is kept exactly as written: `" 7"` and `"7"` are two IDs, and a leading `=`, `+`,
    `-`, `@`, tab or quote (a spreadsheet formula, or what neutralised one) stays, so every
    prediction joins back to its input row byte for byte. Parquet / JSON numbers become
    their decimal text (`7`, `7.0` -> "7")."""
    if id_problem(value) is not None:
        return None
    return _as_string(value)


def printable(value: Any) -> Any:
    """A raw value as JSON-safe text: undecodable bytes shown as \\x escapes, None kept."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return str(value)
