"""The sweep document: a base job spec, a space to search, and how.

Validated once, at the edge, like a job spec — including every trial's job
spec, so a sweep that parses can be stored and will run. Trials are numbered
0..n_trials-1; trial i's values are a function of (seed, i) alone, and each
rung of a trial is an ordinary job whose spec `trial_spec` gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.spec import NAME, JobSpec, SpecError, parse_spec, read_document
from core.sweep.space import (Dimension, SweepError, shown, apply_values, grid_point, grid_size,
                              parse_space)

METHODS = ("grid", "random", "halving")
# Metrics every synchronous job's history records at its stop (core.trainer.step_record).
METRICS = {"val_accuracy": "max", "val_loss": "min", "loss": "min"}
MAX_TRIALS = 1000  # every trial's job spec is validated when the sweep is: this bounds that work
MAX_CONCURRENT = 1024
DEFAULT_CONCURRENT = 2
DEFAULT_REDUCTION = 3
FIELDS = ("name", "seed", "method", "base", "space", "objective", "max_trials", "max_concurrent_trials",
          "halving")


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" or "max"

    def better_first(self, value: float) -> float:
        """A sort key that puts the best value first."""
        return -value if self.mode == "max" else value


@dataclass(frozen=True)
class SweepSpec:
    name: str
    seed: int
    method: str
    base: dict  # the base job spec as validated JSON data (defaults filled in)
    space: tuple[Dimension, ...]
    objective: Objective
    max_trials: int | None
    max_concurrent_trials: int
    n_trials: int
    rungs: tuple[int, ...]  # the step count at which each rung ends; the last is base training.steps
    reduction_factor: int  # halving only (1 otherwise)
    reproducible: bool  # False for async trials: their bits depend on timing

    def values(self, trial: int) -> dict[str, Any]:
        """Trial `trial`'s value of every searched path, in path order."""
        self._check_trial(trial)
        point = grid_point(self.space, trial % grid_size(self.space))
        return {d.path: point[d.path] if d.enumerated else d.sample(self.seed, trial) for d in self.space}

    def trial_name(self, trial: int) -> str:
        """The job name of every rung of a trial: the same for all of them,
        since a checkpoint belongs to a spec, name included."""
        return f"{self.name}-t{trial}"

    def trial_spec(self, trial: int, rung: int) -> JobSpec:
        """The job that runs rung `rung` of trial `trial`: the base with the
        trial's values, stopping at the rung's step count (the last rung runs
        to training.steps)."""
        if not 0 <= rung < len(self.rungs):
            raise ValueError(f"rung must be in [0, {len(self.rungs) - 1}], got {rung!r}")
        raw = apply_values(self.base, self.values(trial))
        raw["name"] = self.trial_name(trial)
        raw["training"]["stop_at"] = self.rungs[rung] if rung < len(self.rungs) - 1 else None
        return parse_spec(raw)

    def document(self) -> dict:
        """The sweep as normalized JSON data: what parse_sweep accepts again."""
        doc = {"name": self.name, "seed": self.seed, "method": self.method, "base": self.base,
               "space": {d.path: d.document() for d in self.space},
               "objective": {"metric": self.objective.metric, "mode": self.objective.mode},
               "max_trials": self.max_trials, "max_concurrent_trials": self.max_concurrent_trials}
        if self.method == "halving":
            doc["halving"] = {"reduction_factor": self.reduction_factor, "rungs": list(self.rungs)}
        return doc

    def to_json(self) -> str:
        return json.dumps(self.document(), sort_keys=True)

    def _check_trial(self, trial: int) -> None:
        if not isinstance(trial, int) or not 0 <= trial < self.n_trials:
            raise ValueError(f"trial must be in [0, {self.n_trials - 1}], got {trial!r}")


def parse_sweep(raw: Any) -> SweepSpec:
    """Validate a sweep document given as a dict; SweepError names the field and the value."""
    if not isinstance(raw, dict):
        raise SweepError(f"sweep must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:
        raise SweepError(f"{unknown[0]}: unknown field (a sweep has {', '.join(FIELDS)})")
    for needed in ("base", "space"):
        if needed not in raw:
            raise SweepError(f"{needed}: field required")
    name = _name(raw.get("name", "sweep"))
    seed = _int("seed", raw.get("seed", 0), 0, 2**63 - 1)
    method = raw.get("method", "random")
    if method not in METHODS:
        raise SweepError(f"method: must be one of {', '.join(METHODS)}, got {shown(method)}")
    base = _base(raw["base"])
    space = parse_space(raw["space"])
    objective = _objective(raw.get("objective", {"metric": "val_loss"}), base)
    max_trials = None if raw.get("max_trials") is None else _int("max_trials", raw["max_trials"], 1, MAX_TRIALS)
    concurrent = _int("max_concurrent_trials", raw.get("max_concurrent_trials", DEFAULT_CONCURRENT), 1,
                      MAX_CONCURRENT)
    n_trials = _trial_count(method, space, max_trials)
    steps = base["training"]["steps"]
    if method == "halving":
        reduction, rungs = _halving(raw.get("halving", {}), steps, space)
    elif "halving" in raw:
        raise SweepError(f"halving: only for method 'halving', got method {method!r}")
    else:
        reduction, rungs = 1, (steps,)
    sweep = SweepSpec(name, seed, method, base, space, objective, max_trials, concurrent, n_trials, rungs,
                      reduction, reproducible=True)
    modes = {_trial(sweep, trial).training.mode for trial in range(n_trials)}
    if method == "halving" and "async" in modes:
        raise SweepError("method: 'halving' needs synchronous trials (a promotion continues a trial to the "
                         "same bits), got training.mode 'async'")
    return SweepSpec(**{**sweep.__dict__, "reproducible": modes == {"sync"}})


def load_sweep(source: str | Path | dict | SweepSpec) -> SweepSpec:
    """A SweepSpec from a SweepSpec, a dict, or a path to a YAML/JSON file."""
    if isinstance(source, SweepSpec):
        return source
    if isinstance(source, dict):
        return parse_sweep(source)
    return parse_sweep(read_document(Path(source), "sweep", SweepError))


def _trial(sweep: SweepSpec, trial: int) -> JobSpec:
    """Trial `trial`'s last-rung spec; a SweepError names the trial and its values if refused."""
    try:
        return sweep.trial_spec(trial, len(sweep.rungs) - 1)
    except SpecError as err:
        values = ", ".join(f"{p}={v!r}" for p, v in sweep.values(trial).items())
        reason = str(err).removeprefix("spec: ")  # a whole-spec rule names its fields itself
        raise SweepError(f"space: trial {trial} ({values}) is not a valid job spec: {reason}") from None


def _name(value: Any) -> str:
    # trial names append "-t<index>": keep room for it within a job name's 200 characters
    if not isinstance(value, str) or len(value) > 180 or not NAME.fullmatch(value):
        raise SweepError(f"name: must be 1-180 letters, digits, '.', '_' and '-', starting with a letter "
                         f"or digit, got {shown(value)}")
    return value


def _int(field: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SweepError(f"{field}: must be an integer in [{low}, {high}], got {shown(value)}")
    return value


def _base(raw: Any) -> dict:
    try:
        spec = parse_spec(raw)
    except SpecError as err:
        raise SweepError(f"base: {err}") from None
    if spec.training.stop_at is not None:
        raise SweepError(f"base.training.stop_at: set by the sweep's rungs, got {spec.training.stop_at!r}")
    return spec.model_dump(mode="json")


def _objective(raw: Any, base: dict) -> Objective:
    if not isinstance(raw, dict) or set(raw) - {"metric", "mode"} or "metric" not in raw:
        raise SweepError(f"objective: must be {{metric: ..., mode: min|max}}, got {shown(raw)}")
    metric = raw["metric"]
    if metric not in METRICS:
        raise SweepError(f"objective.metric: must be a recorded metric, one of {', '.join(METRICS)}, "
                         f"got {shown(metric)}")
    mode = raw.get("mode", METRICS[metric])
    if mode not in ("min", "max"):
        raise SweepError(f"objective.mode: must be min or max, got {shown(mode)}")
    split = base["data"]["validation_split"]
    if metric.startswith("val_") and split == 0:
        raise SweepError(f"objective.metric: {metric!r} is not recorded with base.data.validation_split 0")
    if metric == "val_accuracy" and base["model"]["output"] == "identity":
        raise SweepError("objective.metric: 'val_accuracy' is not recorded for a regression "
                         "(base.model.output 'identity')")
    return Objective(metric, mode)


def _trial_count(method: str, space: tuple[Dimension, ...], max_trials: int | None) -> int:
    grid = grid_size(space)
    sampled = [d.path for d in space if not d.enumerated]
    if method == "grid":
        if sampled:
            raise SweepError(f"space.{sampled[0]}: method 'grid' enumerates grid paths only, "
                             f"got a {next(d.kind for d in space if d.path == sampled[0])!r} distribution")
        if max_trials is not None and grid > max_trials:
            raise SweepError(f"max_trials: the grid has {grid} points, more than max_trials {max_trials}")
        return grid
    has_grid = len(sampled) < len(space)
    if max_trials is None:
        if not has_grid:
            raise SweepError(f"max_trials: required for method {method!r} without grid paths")
        max_trials = grid
    if has_grid and grid > max_trials:
        raise SweepError(f"max_trials: the grid has {grid} points, more than max_trials {max_trials}")
    return max_trials


def _halving(raw: Any, steps: int, space: tuple[Dimension, ...]) -> tuple[int, tuple[int, ...]]:
    if not isinstance(raw, dict) or set(raw) - {"reduction_factor", "rungs"}:
        raise SweepError(f"halving: must be {{reduction_factor: N, rungs: [steps, ...]}}, got {shown(raw)}")
    if any(d.path == "training.steps" for d in space):
        raise SweepError("space.training.steps: halving's rungs decide how long trials train; "
                         "set base.training.steps instead")
    reduction = _int("halving.reduction_factor", raw.get("reduction_factor", DEFAULT_REDUCTION), 2, 1000)
    if "rungs" not in raw:
        rungs = tuple(steps // reduction ** k for k in (2, 1, 0))
        if rungs[0] < 1:
            raise SweepError(f"halving.rungs: base.training.steps {steps} is too few for three rungs with "
                             f"reduction_factor {reduction}; give rungs explicitly")
        return reduction, rungs
    rungs = raw["rungs"]
    if (not isinstance(rungs, list) or not rungs
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in rungs)):
        raise SweepError(f"halving.rungs: must be a list of step counts, got {shown(rungs)}")
    if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[0] < 1:
        raise SweepError(f"halving.rungs: must be positive and strictly increasing, got {rungs!r}")
    if rungs[-1] != steps:
        raise SweepError(f"halving.rungs: the last rung must be base.training.steps ({steps}), got {rungs!r}")
    return reduction, tuple(rungs)


def rung_sizes(sweep: SweepSpec) -> tuple[int, ...]:
    """How many trials run each rung: all of them, then max(1, n // eta) of the previous."""
    sizes = [sweep.n_trials]
    for _ in sweep.rungs[1:]:
        sizes.append(max(1, sizes[-1] // sweep.reduction_factor))
    return tuple(sizes)

