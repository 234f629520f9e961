"""Who watches a training run: the moments of `run_training` a person may want to see, as
an object the recipe calls at its steps (torchtune's MetricLoggerInterface in spirit).

    summary = run_training(cfg)                          # LoggedTraining: the moments as log records
    summary = run_training(cfg, observer=TrainTerminal(command))   # terminal/training.py: what a person sees

An observer only shows: the recipe's steps and their order are the same whoever watches.
How a job ends (the closing table, a failure's one line) belongs to whoever started it, since
it sees the summary or the exception that `run_training` returns or raises.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sentiment_ray.config import ExperimentConfig
from sentiment_ray.train.preflight import Checked

log = logging.getLogger(__name__)


class TrainingObserver(Protocol):
    """The moments of a training run, in the order `run_training` reaches them."""

    # True: rank 0 prints phase, step and checkpoint events for the driver to show
    # (console.WorkerEvents); an observer that draws no progress leaves the workers quiet.
    wants_events: bool

    def run_started(self, cfg: ExperimentConfig, run_dir: str, checked: Checked) -> None:
        """The run folder is locked (and cleared with new_run); the model and data passed the
        driver's checks. A checkpoint in `run_dir` now is the one this run resumes from."""

    def cluster_starting(self, cfg: ExperimentConfig) -> None:
        """Just before connecting to (or starting) Ray: the last moment before Ray's own
        output begins."""

    def cluster_started(self) -> None:
        """Ray is connected: worker output reaches the driver from here on."""

    def training_started(self, run_dir: str) -> None:
        """The TorchTrainer is built and about to fit."""


class LoggedTraining:
    """The observer of a run started from Python (Tune, tests, a notebook): the moments as
    INFO records. Such a caller gets the checks and the summary as values, so nothing here
    prints unless logging is configured to."""

    wants_events = False

    def run_started(self, cfg: ExperimentConfig, run_dir: str, checked: Checked) -> None:
        log.info("run %s: %s", cfg.run.name, run_dir)
        for warning in checked.warnings:
            log.info("%s", warning)
        log.info("%s", checked.describe())

    def cluster_starting(self, cfg: ExperimentConfig) -> None:
        log.info("connecting to Ray (run.ray_address=%s)", cfg.run.ray_address)

    def cluster_started(self) -> None: ...

    def training_started(self, run_dir: str) -> None:
        log.info("training: checkpoints and outputs go to %s", run_dir)
