"""What the training driver checks before it starts Ray, so that a mistake costs a second
and one line instead of a cluster start and a worker traceback: the model can be found and
the training data reads and validates the way the worker will read it (train/data.py).

    checked = check_run(cfg)          # DataError / ModelNotFoundError, or what was checked
    checked.describe()                # "3,500 training rows, 200 validation rows (data/x.csv)"

Inputs up to `WHOLE_FILE_BYTES` are read whole, through the worker's own `load_splits`
(columns, every row, the validation split and row limits); larger ones are checked by their
header and the first `SAMPLE_ROWS` rows of each file. Hugging Face datasets are left to the
worker (loading one may mean a download). Nothing is written: skipped rows
(`data.on_bad_rows=skip`) go to a temporary quarantine file, counted, then removed.

A model folder that is missing here is an error when this driver starts its own cluster;
a driver joining a cluster only warns (the workers may be on machines that have it).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

from sentiment_ray import cluster
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.files import describe_inputs, expand_inputs, not_read_warning
from sentiment_ray.labels import LabelSet
from sentiment_ray.models import ModelNotFoundError, check_model_available
from sentiment_ray.train.data import load_labelled, load_splits

log = logging.getLogger(__name__)

WHOLE_FILE_BYTES = 8 * 2**20  # ~50,000 short rows: a few seconds
SAMPLE_ROWS = 2_000


@dataclass
class Checked:
    """What the driver checked (for the run's opening lines)."""

    sources: list[str] = field(default_factory=list)
    whole: bool = True
    train_rows: int | None = None
    validation_rows: int | None = None
    bad_rows: int = 0
    sampled_rows: int = 0
    model: str = ""
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = ", ".join(self.sources)
        if self.train_rows is None and not self.sampled_rows:
            return f"data: {where} (read by the worker)"
        if not self.whole:
            return f"data: {where}: columns and the first {self.sampled_rows:,} rows checked (the worker reads the rest)"
        text = f"data: {self.train_rows:,} training rows, {self.validation_rows:,} validation rows ({where})"
        if self.bad_rows:
            text += f"; {self.bad_rows:,} bad rows will be quarantined"
        return text


def check_run(cfg: ExperimentConfig) -> Checked:
    """The model and the data of a training run, checked on this machine."""
    checked = Checked()
    try:
        checked.model = check_model_available(cfg.model.name)
    except ModelNotFoundError as err:
        if not cluster.joins_existing_cluster(cfg.run.ray_address):
            raise
        checked.warnings.append(f"{err} on this machine; the training workers must have it")
    check_data(cfg, checked)
    return checked


def check_data(cfg: ExperimentConfig, checked: Checked | None = None) -> Checked:
    checked = checked or Checked()
    d = cfg.data
    labels = LabelSet(cfg.prompt.labels)
    sources = [s for s in (d.train_dataset or d.train_path, d.validation_dataset or d.validation_path) if s]
    checked.sources = [s.describe() if hasattr(s, "describe") else _short(s) for s in sources]
    if d.train_dataset is not None or d.validation_dataset is not None or not sources:
        if not sources:
            load_splits(cfg, labels, tempfile.gettempdir(), False)  # raises: no training source
        return checked
    files = []
    for source in sources:
        inputs = expand_inputs(source)
        files += inputs.files
        if inputs.not_read:
            checked.warnings.append(not_read_warning(source, inputs.not_read))
    size = sum(f.size for f in describe_inputs(files))
    with tempfile.TemporaryDirectory(prefix="sentiment-ray-check-") as scratch:
        if size <= WHOLE_FILE_BYTES:
            splits = load_splits(cfg, labels, scratch, use_configured_quarantine=False)
            checked.train_rows, checked.validation_rows = splits.train.num_rows, splits.validation.num_rows
            checked.bad_rows = sum(splits.bad_rows.values())
            return checked
        checked.whole = False
        for source in sources:
            data = load_labelled(source, d, labels, quarantine_path=f"{scratch}/quarantine.jsonl", max_rows_per_file=SAMPLE_ROWS)
            checked.sampled_rows += len(data) + data.bad_rows.count
    return checked


def _short(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    if "://" in path or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path
