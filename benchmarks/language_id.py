"""Language identification as the label job runs it (`languages.detect`, py3langid) on rows
whose language is known: accuracy overall and on short texts, and rows per second on one core
(docs/benchmarks.md).

    .venv/bin/python benchmarks/language_id.py ../shared/data/sentiment_dev.csv --n 4000
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentiment_ray import languages  # noqa: E402

SHORT_CHARS = 40


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="a CSV with `sentence` and `lang` columns")
    parser.add_argument("--n", type=int, default=4000, help="rows drawn (seeded)")
    args = parser.parse_args(argv)
    with open(args.data, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lang") and r.get("sentence")]
    rows = random.Random(0).sample(rows, min(args.n, len(rows)))
    texts, truth = [r["sentence"] for r in rows], [r["lang"].strip().lower() for r in rows]
    languages.detect(texts[:10])  # the model loads on first use: not timed
    started = time.perf_counter()
    found = languages.detect(texts)
    seconds = time.perf_counter() - started
    short = [i for i, t in enumerate(texts) if len(t) <= SHORT_CHARS]
    right = [a == b for a, b in zip(found, truth)]
    print(
        json.dumps(
            {
                "rows": len(texts),
                "accuracy": round(sum(right) / len(right), 4),
                "short_rows": len(short),
                "accuracy_short": round(sum(right[i] for i in short) / len(short), 4) if short else None,
                "rows_per_s": round(len(texts) / seconds),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
