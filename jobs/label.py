"""Label a large dataset on Ray Data (`sentiment-ray label`).

The `ray job submit -- python jobs/label.py ...` entry point: runs from a checkout or an
uploaded working dir without installing the package. The parser and main function live in
sentiment_ray/cli.py; `python jobs/label.py --help` lists every option with examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout (python jobs/label.py) or an uploaded working dir without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentiment_ray.cli import label_main as main  # noqa: E402
from sentiment_ray.cli import label_parser as parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
