"""Benchmark training speed/memory (unsloth vs hf) and labelling throughput (`sentiment-ray benchmark`).

The `python jobs/benchmark.py train|label ...` entry point: runs from a checkout without
installing the package. The parser and main function live in sentiment_ray/cli.py and
sentiment_ray/bench/job.py; `python jobs/benchmark.py --help` lists every option with examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout (python jobs/benchmark.py) without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentiment_ray.cli import benchmark_main as main  # noqa: E402
from sentiment_ray.cli import benchmark_parser as parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
