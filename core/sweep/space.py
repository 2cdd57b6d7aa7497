"""A sweep's search space: one distribution per dotted path of the job spec.

Each dimension is either enumerated (`grid`) or sampled (`choice`,
`uniform`, `log_uniform`, `int_uniform`). A sampled value depends only on
the sweep's seed, the trial's index and the path — never on which trials
ran first — so the same sweep document always gives the same trials.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from core.spec import JobSpec, SpecError

KINDS = ("grid", "choice", "uniform", "log_uniform", "int_uniform")
MAX_DIMENSIONS = 64
MAX_VALUES = 10_000  # entries of one grid or choice
# Paths a sweep may not set: the trial's name is the sweep's to give, and
# where a job stops is the sweep's rungs' business.
RESERVED_PATHS = ("name", "training.stop_at")


class SweepError(SpecError):
    """A sweep document that cannot run; the message names the field and the value."""


@dataclass(frozen=True)
class Dimension:
    path: str  # dotted, e.g. "training.optimizer.lr"
    kind: str  # one of KINDS
    args: tuple  # grid/choice: the values; the others: (low, high)

    @property
    def enumerated(self) -> bool:
        return self.kind == "grid"

    def sample(self, seed: int, trial: int) -> Any:
        """This dimension's value in trial `trial`: a function of (seed, trial, path) only."""
        rng = np.random.default_rng([seed, trial, zlib.crc32(self.path.encode())])
        if self.kind == "choice":
            return self.args[int(rng.integers(len(self.args)))]
        low, high = self.args
        if self.kind == "int_uniform":
            return int(rng.integers(low, high, endpoint=True))
        if self.kind == "log_uniform":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        return float(rng.uniform(low, high))

    def document(self) -> dict:
        return {self.kind: list(self.args)}


def parse_space(raw: Any) -> tuple[Dimension, ...]:
    """The dimensions of `space`, sorted by path (the order never depends on
    how a document was written or stored), each checked against the job spec."""
    if not isinstance(raw, dict):
        raise SweepError(f"space must be a mapping of dotted paths to distributions, got {shown(raw)}")
    if not raw:
        raise SweepError("space must name at least one path to search, got an empty mapping {}")
    if len(raw) > MAX_DIMENSIONS:
        raise SweepError(f"space has {len(raw)} paths, at most {MAX_DIMENSIONS} are allowed")
    return tuple(_dimension(path, raw[path]) for path in sorted(raw, key=str))


def _dimension(path: Any, raw: Any) -> Dimension:
    if not isinstance(path, str):
        raise SweepError(f"space: paths must be strings, got {shown(path)}")
    field = f"space.{path}"
    _check_path(path, field)
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SweepError(f"{field}: must be one of {{{', '.join(KINDS)}: ...}}, got {shown(raw)}")
    (kind, args), = raw.items()
    field = f"{field}.{kind}"
    if kind not in KINDS:
        raise SweepError(f"{field}: unknown distribution {kind!r}, expected one of {', '.join(KINDS)}")
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise SweepError(f"{field}: must be a non-empty list of values, got {shown(args)}")
        if len(args) > MAX_VALUES:
            raise SweepError(f"{field}: has {len(args)} values, at most {MAX_VALUES} are allowed")
        try:
            json.dumps(args)
        except (TypeError, ValueError):
            raise SweepError(f"{field}: values must be JSON data (numbers, strings, lists, mappings), "
                             f"got {shown(args)}") from None
        return Dimension(path, kind, tuple(args))
    return Dimension(path, kind, _bounds(field, kind, args))


def _bounds(field: str, kind: str, args: Any) -> tuple:
    numbers = (int,) if kind == "int_uniform" else (int, float)
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, numbers) and not isinstance(a, bool) for a in args)):
        what = "integers" if kind == "int_uniform" else "numbers"
        raise SweepError(f"{field}: must be [low, high], two {what}, got {shown(args)}")
    low, high = args
    if not all(math.isfinite(a) for a in args):
        raise SweepError(f"{field}: bounds must be finite, got {args!r}")
    if low > high:
        raise SweepError(f"{field}: low must be <= high, got [{low!r}, {high!r}]")
    if kind == "log_uniform" and low <= 0:
        raise SweepError(f"{field}: a log scale needs positive bounds, got [{low!r}, {high!r}]")
    return (low, high) if kind == "int_uniform" else (float(low), float(high))


def _check_path(path: str, field: str) -> None:
    """Refuse a path that names no field of the job spec."""
    if path in RESERVED_PATHS:
        raise SweepError(f"{field}: {path!r} is set by the sweep itself and cannot be searched")
    model: type[BaseModel] = JobSpec
    walked: list[str] = []
    for part in path.split("."):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            where = ".".join(walked) or "the job spec"
            raise SweepError(f"{field}: unknown path {path!r} ({where} has no field {part!r})")
        walked.append(part)
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is not None:
        raise SweepError(f"{field}: path {path!r} names a section, not a field (search one of its fields: "
                         f"{', '.join(f'{path}.{f}' for f in model.model_fields)})")


def grid_size(space: tuple[Dimension, ...]) -> int:
    """How many points the enumerated dimensions span (1 when there are none)."""
    return math.prod(len(d.args) for d in space if d.enumerated)


def grid_point(space: tuple[Dimension, ...], index: int) -> dict[str, Any]:
    """Point `index` of the grid: paths in sorted order, the last varying fastest
    (as itertools.product enumerates them)."""
    enumerated = [d for d in space if d.enumerated]
    point = {}
    for d in reversed(enumerated):
        index, position = divmod(index, len(d.args))
        point[d.path] = d.args[position]
    return {d.path: point[d.path] for d in enumerated}


def grid_points(space: tuple[Dimension, ...]) -> list[dict[str, Any]]:
    """Every grid point in order (for tests and docs; trials use grid_point)."""
    enumerated = [d for d in space if d.enumerated]
    return [dict(zip((d.path for d in enumerated), values))
            for values in itertools.product(*(d.args for d in enumerated))]


def apply_values(base: dict, values: dict[str, Any]) -> dict:
    """A copy of the job spec `base` (JSON data) with each dotted path set."""
    raw = _copy(base)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _copy(value)
    return raw


def _copy(value: Any) -> Any:
    """A deep copy of JSON data (a sweep's documents are JSON data throughout)."""
    return json.loads(json.dumps(value))


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
