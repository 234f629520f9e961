"""A label job as the recipe's steps pass it along: what it was asked to do (`LabelRun`,
resolved by the driver before it takes the output folder's lock) and the plan it works
through (`UnitPlan`: the units, which are done, what the actors stamp on their outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.files import Inputs
from sentiment_ray.io.storage import Storage
from sentiment_ray.label.plan import WorkUnit


@dataclass(frozen=True)
class LabelRun:
    """One label job's settings."""

    cfg: ExperimentConfig
    input_path: str  # as the user gave it (path, glob, directory or URI)
    inputs: Inputs  # the files it names, and those of a named folder it does not read
    out: Storage  # the output folder
    adapter: dict[str, Any] | None  # the adapter's identity (label/plan.py adapter_identity), None: the base model
    adapter_path: str | None
    overwrite: bool  # replace what an earlier run with other inputs or settings wrote
    rows_per_unit: int | None  # a work unit's rows (--rows-per-unit, else label.rows_per_unit); None: the planner chooses
    started: float  # time.perf_counter() when the job started, for the summary's seconds

    @property
    def files(self) -> list[str]:
        return self.inputs.files


@dataclass(frozen=True)
class UnitPlan:
    """The plan this run works through and where it stands."""

    manifest: dict[str, Any]  # label/plan.py's manifest: input, settings, units, total rows
    units: list[WorkUnit]
    done: set[str]  # ids of the units committed before this run
    identity: dict[str, Any]  # what every unit's outputs and commit marker record
    acceptance: dict[str, Any] | None  # the certified label.max_error threshold, for the actors

    @property
    def plan_id(self) -> str:
        return self.manifest["plan_id"]

    @property
    def pending(self) -> list[WorkUnit]:
        return [u for u in self.units if u.unit_id not in self.done]

    @property
    def done_rows(self) -> int:
        return sum(u.num_rows for u in self.units if u.unit_id in self.done)
