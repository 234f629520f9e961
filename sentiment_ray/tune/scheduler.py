"""What a tune experiment adds to Ray Tune: ASHA in training steps that never stops a trial at
its final report and keeps its rungs across restarts, and a callback that keeps every report
of every trial across driver restarts.

The classes subclass Ray Tune's, so they are built on first use (ray.tune is imported lazily)
and published as attributes of this module (module `__getattr__`): the scheduler and the
callback pickled in tuner.pkl unpickle to the same classes on restore.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sentiment_ray import compat
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.storage import Storage
from sentiment_ray.tune import layout
from sentiment_ray.tune import search_space as ss

log = logging.getLogger(__name__)

_LAZY_NAMES = ("FinalStepAwareASHA", "HistoryCallback")
_LAZY_CLASSES: dict[str, type] = {}


def _make_asha_class():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class FinalStepAwareASHA(AsyncHyperBandScheduler):
        """ASHA (time unit: the training step) with two additions:

        - A STOP on a trial's final report becomes CONTINUE: at its last step a trial has
          finished training and is writing its adapter; stopping it then would lose the
          adapter and gain nothing. The result still counts for the rungs.
        - The rungs' records are saved to the experiment folder after every change and
          loaded again when the experiment is restored (Tune itself restores schedulers
          empty, so trials resumed or started after a restart would be compared with nothing)."""

        def __init__(self, *args, default_max_steps: int, experiment: str | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._default_max_steps = int(default_max_steps)
            self._experiment = experiment
            self._state_loaded = False

        def __setstate__(self, state):
            # Unpickled from tuner.pkl on restore: read the saved rungs before the next decision.
            self.__dict__.update(state)
            self._state_loaded = False

        # -- final step

        def _is_final(self, trial, result: dict) -> bool:
            max_steps = (trial.config or {}).get("train.max_steps", self._default_max_steps)
            step = result.get("step")
            return isinstance(step, (int, float)) and step >= max_steps

        def on_trial_result(self, tune_controller, trial, result):
            self._load_state()
            decision = super().on_trial_result(tune_controller, trial, result)
            self._save_state()
            if decision == self.STOP and self._is_final(trial, result):
                return self.CONTINUE
            return decision

        def on_trial_complete(self, tune_controller, trial, result):
            self._load_state()
            super().on_trial_complete(tune_controller, trial, result)
            self._save_state()

        def on_trial_add(self, tune_controller, trial):
            self._load_state()
            super().on_trial_add(tune_controller, trial)

        # -- persistence

        def rung_records(self) -> list[list[list]]:
            """Per bracket: [[milestone, {trial id: recorded reward}], ...]."""
            return [[[milestone, dict(recorded)] for milestone, recorded in rungs] for rungs in compat.asha_rungs(self)]

        def _save_state(self) -> None:
            if not self._experiment:
                return
            try:
                Storage(self._experiment).write_json(layout.SCHEDULER_STATE_FILE, {"rungs": self.rung_records()})
            except Exception:  # the experiment goes on; a restart would forget the rungs
                log.exception("could not save the scheduler state to %s", self._experiment)

        def _load_state(self) -> None:
            if self._state_loaded:
                return
            self._state_loaded = True
            if not self._experiment:
                return
            try:
                saved = Storage(self._experiment).read_json_or_none(layout.SCHEDULER_STATE_FILE)
            except (OSError, ValueError):
                return
            if not saved or "rungs" not in saved:
                return
            for rungs, saved_rungs in zip(compat.asha_rungs(self), saved["rungs"]):
                milestones = {m: recorded for m, recorded in rungs}
                for milestone, recorded in saved_rungs:
                    if milestone in milestones:
                        milestones[milestone].update(recorded)
            log.info("scheduler rungs restored from %s", self._experiment)

    return FinalStepAwareASHA


def read_history(exp_path: str, trial_id: str) -> list[dict] | None:
    """The reports of a trial recorded by HistoryCallback, or None if there is no record."""
    try:
        text = Storage(exp_path).read_text(layout.history_file(trial_id))
    except (FileNotFoundError, OSError):
        return None
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash
            continue
    return rows


def _make_history_callback_class():
    from ray.tune import Callback

    class HistoryCallback(Callback):
        """Keeps every report of every trial in `<exp>/trial_histories/<trial id>.jsonl`,
        across driver restarts. (Tune's own result.json of a resumed trial starts again from
        the resumed attempt's reports.) Runs on the Tune driver."""

        def __init__(self, exp_path: str):
            self.exp_path = exp_path
            self._rows: dict[str, list[dict]] = {}

        def __getstate__(self):
            return {"exp_path": self.exp_path}

        def __setstate__(self, state):
            self.exp_path = state["exp_path"]
            self._rows = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            try:
                self._record(trial.trial_id, result)
            except Exception:  # a full disk must not stop the experiment
                log.exception("could not record the history of trial %s", trial.trial_id)

        def _record(self, trial_id: str, result: dict) -> None:
            rows = self._rows.get(trial_id)
            if rows is None:
                rows = self._rows[trial_id] = read_history(self.exp_path, trial_id) or []
            rows.append({k: v for k, v in result.items() if k != "config" and _jsonable(v)})
            text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
            Storage(self.exp_path).write_text(layout.history_file(trial_id), text)

    return HistoryCallback


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def lazy_class(name: str) -> type:
    if name not in _LAZY_CLASSES:
        if name == "FinalStepAwareASHA":
            cls = _make_asha_class()
        elif name == "HistoryCallback":
            cls = _make_history_callback_class()
        else:
            raise AttributeError(name)
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
        _LAZY_CLASSES[name] = cls
    return _LAZY_CLASSES[name]


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return lazy_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_scheduler(cfg: ExperimentConfig, space: dict[str, dict], experiment: str | None = None):
    """FIFO, or ASHA in training steps (see FinalStepAwareASHA; `experiment`: the folder
    where its rungs are kept for a restart)."""
    from ray.tune.schedulers import FIFOScheduler

    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    base = cfg.model_dump(mode="json")
    max_t = int(ss.max_value(space, "train.max_steps", base))
    grace = min(t.grace_period * cfg.train.eval_steps, max_t)
    return lazy_class("FinalStepAwareASHA")(
        time_attr="step",
        max_t=max_t,
        grace_period=grace,
        reduction_factor=t.reduction_factor,
        default_max_steps=cfg.train.max_steps,
        experiment=experiment,
    )


def history_callback(exp_path: str):
    return lazy_class("HistoryCallback")(exp_path)
