"""Metrics and an HTML report from predictions or a tune experiment (`sentiment-ray eval`).

Runs from a checkout (or an uploaded working dir) without installing the package, like the
other jobs/*.py. The parser and main function live in sentiment_ray/cli.py;
`python jobs/eval.py --help` lists every option with examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout (python jobs/eval.py) or an uploaded working dir without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentiment_ray.cli import eval_main as main  # noqa: E402
from sentiment_ray.cli import eval_parser as parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
