"""The job spec: what to train, on what data, and how.

A spec arrives as YAML, JSON or a dict and is validated here, once, at the
edge: unknown fields are refused, every number is checked for sense, and each
error names the field and the bad value. Inside the project a `JobSpec` is
trusted as it is.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Upper bounds that stop absurd requests (a billion workers, a trillion
# parameters) before they reach the cluster. Generous for a numpy MLP.
MAX_WORKERS = 1024
MAX_SHARDS = 4096
MAX_LAYER_WIDTH = 65_536
MAX_HIDDEN_LAYERS = 64
MAX_PARAMETERS = 200_000_000
MAX_STEPS = 100_000_000
MAX_BATCH = 10_000_000
MAX_SYNTHETIC_SAMPLES = 10_000_000
MAX_SYNTHETIC_FEATURES = 100_000
MAX_CLASSES = 100_000
MAX_WORKER_TIMEOUT_S = 7 * 24 * 3600.0
MAX_PATH_CHARS = 4096  # Linux's PATH_MAX
MAX_NAME_BYTES = 255  # one path component, as most file systems allow

BUILTIN_SOURCES = ("digits", "iris", "wine", "breast_cancer", "synthetic")
# a file source's suffixes; a source with none (or ending in '/') names a folder
SOURCE_SUFFIXES = (".npz", ".csv", ".parquet", ".pq")
# A job's name names files (`shardprop train` writes <name>.npz and a folder
# <name>-<time>): no path separator, no leading dot, no NUL, nothing to escape.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def validation_rows(n_rows: int, validation_split: float) -> int:
    """How many of n_rows the validation split holds (rounded down)."""
    return int(math.floor(n_rows * validation_split))


class SpecError(ValueError):
    """A job spec that cannot run; the message names the field and the value."""


class _Strict(BaseModel):
    # Unknown fields are refused; "1" is not silently an int; NaN/Inf never pass.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def positive(upper: int) -> Any:
    """An int in [1, upper]; pydantic's refusal names the bound, and
    `_format_errors` adds the field and the value."""
    return Annotated[int, Field(gt=0, le=upper)]


def at_most(upper: int) -> Any:
    """An int in [0, upper]."""
    return Annotated[int, Field(ge=0, le=upper)]


class DataSpec(_Strict):
    source: str = Field(description="a built-in data set name, a .npz/.csv/.parquet file, a folder (a prepared "
                        "data set or .parquet files) or s3://bucket/prefix (a prepared data set)")
    validation_split: float = Field(0.2, description="fraction of rows held out for validation, in [0, 1)")
    split_seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed of the split into training and "
                                   "validation rows, of their shard order and of synthetic data (default: the "
                                   "job's seed)")
    shards: positive(MAX_SHARDS) = Field(4, description="number of logical shards of the training rows")
    samples: positive(MAX_SYNTHETIC_SAMPLES) = Field(2000, description="synthetic only: number of rows")
    features: positive(MAX_SYNTHETIC_FEATURES) = Field(20, description="synthetic only: number of input columns")
    classes: int = Field(3, description="synthetic only: number of classes")
    label_column: str | int | None = Field(
        None, description="csv and parquet only: label column name or index (default: the last)")
    standardize: bool = Field(True, description="scale inputs by the training split's mean and standard deviation")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("source must name a built-in data set or a file, got an empty string")
        control = next((i for i, c in enumerate(v) if ord(c) < 32 or ord(c) == 127), None)
        if control is not None:
            raise ValueError(f"source must not contain control characters such as a NUL byte, "
                             f"got one at position {control}")
        if len(v) > MAX_PATH_CHARS:
            raise ValueError(f"source must be at most {MAX_PATH_CHARS} characters, got {len(v)}")
        longest = max(len(part.encode("utf-8", "surrogatepass")) for part in v.split("/"))
        if longest > MAX_NAME_BYTES:
            raise ValueError(f"source's file and folder names must be at most {MAX_NAME_BYTES} bytes each, "
                             f"got one of {longest}")
        if v.startswith("s3://"):
            bucket, _, prefix = v.removeprefix("s3://").partition("/")
            if not bucket or not prefix.strip("/"):
                raise ValueError(f"an s3:// source must be s3://bucket/prefix (a prepared data set), got {v!r}")
            return v
        if v not in BUILTIN_SOURCES and not v.endswith("/") and Path(v).suffix.lower() not in (*SOURCE_SUFFIXES, ""):
            raise ValueError(
                f"source must be one of {', '.join(BUILTIN_SOURCES)}, a {'/'.join(SOURCE_SUFFIXES)} file, "
                f"a folder (a prepared data set or .parquet files; end a name holding a dot with '/') "
                f"or s3://bucket/prefix, got {v!r}"
            )
        return v

    @field_validator("validation_split")
    @classmethod
    def _split(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {v!r}")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: int) -> int:
        if v < 2 or v > MAX_CLASSES:
            raise ValueError(f"classes must be in [2, {MAX_CLASSES}], got {v!r}")
        return v


class ModelSpec(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [64], description="hidden layer widths; [] for none")
    activation: Literal["relu", "tanh", "sigmoid"] = "relu"
    output: Literal["softmax", "sigmoid", "identity"] = "softmax"
    loss: Literal["cross_entropy", "squared_error"] = "cross_entropy"
    bias: bool = True
    init: Literal["he", "xavier", "lecun"] = "he"

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        if len(v) > MAX_HIDDEN_LAYERS:
            raise ValueError(f"hidden has {len(v)} layers, at most {MAX_HIDDEN_LAYERS} are allowed")
        for i, width in enumerate(v):
            if width <= 0 or width > MAX_LAYER_WIDTH:
                raise ValueError(f"hidden[{i}] must be in [1, {MAX_LAYER_WIDTH}], got {width!r}")
        return v

    @model_validator(mode="after")
    def _not_too_large(self) -> "ModelSpec":
        between = sum(a * b for a, b in zip(self.hidden, self.hidden[1:]))
        if between > MAX_PARAMETERS:
            raise ValueError(f"hidden {self.hidden} needs {between} weights, more than {MAX_PARAMETERS}")
        return self

    @model_validator(mode="after")
    def _loss_fits_output(self) -> "ModelSpec":
        if self.loss == "cross_entropy" and self.output == "identity":
            raise ValueError(
                "loss 'cross_entropy' needs output 'softmax' or 'sigmoid', got output 'identity' "
                "(use loss 'squared_error' for regression)"
            )
        return self


class ScheduleSpec(_Strict):
    name: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    step_size: int = Field(100, gt=0, le=MAX_STEPS)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: float = Field(0.0, ge=0.0)


class OptimizerSpec(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0.0, le=1e6)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)

    @model_validator(mode="after")
    def _nesterov(self) -> "OptimizerSpec":
        if self.nesterov and self.momentum <= 0:
            raise ValueError(f"nesterov needs momentum > 0, got momentum {self.momentum!r}")
        return self


class TrainingSpec(_Strict):
    mode: Literal["sync", "async"] = "sync"
    batch_size: positive(MAX_BATCH) = Field(128, description="global batch of one step, split over the shards")
    steps: positive(MAX_STEPS) = Field(description="number of optimizer steps")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    dtype: Literal["float32", "float64"] = "float32"
    eval_every: at_most(MAX_STEPS) = Field(
        25, description="evaluate on the validation split every N steps (0: only at the end)")
    checkpoint_every: at_most(MAX_STEPS) = Field(
        50, description="write a checkpoint every N steps (0: only at the end)")
    max_staleness: at_most(MAX_STEPS) = Field(
        4, description="async only: refuse gradients more than this many versions old")
    max_nonfinite_steps: positive(1_000_000) = Field(
        3, description="fail the job after this many non-finite steps in a row")
    stop_at: positive(MAX_STEPS) | None = Field(
        None, description="stop (succeeded, with a checkpoint) after this many steps; the schedule still "
        "follows `steps`, and a job with a later stop_at resumes from that checkpoint (sweep rungs)")

    @model_validator(mode="after")
    def _stop_within_steps(self) -> "TrainingSpec":
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"stop_at ({self.stop_at}) must be <= steps ({self.steps})")
        if self.stop_at is not None and self.mode == "async":
            raise ValueError(f"stop_at ({self.stop_at}) needs mode 'sync': an async job "
                             "cannot be continued to the same bits")
        return self


class ResourcesSpec(_Strict):
    """Where and how fast a job runs; nothing here changes its trained bits
    (shards, not workers, fix the arithmetic; a shard's gradient always uses
    one BLAS thread; every optimizer rule is elementwise, so k parameter
    slices update exactly as one)."""

    workers: positive(MAX_WORKERS) = Field(2, description="gradient worker actors")
    cpus_per_worker: positive(256) = Field(
        1, description="CPUs each worker reserves and computes shards on concurrently")
    parameter_servers: positive(64) = Field(
        1, description="split the parameter server into k actors by parameter slice")
    pin_cores: bool = Field(
        True, description="pin each worker to cores no other worker holds, while its machine has free ones")
    worker_timeout_s: float = Field(600.0, description="declare workers hung, kill and replace them, when a step "
                                    "(sync) or one worker's computation (async) takes longer than this (seconds, >= 1); 0: never")

    @field_validator("worker_timeout_s")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if v != 0 and not 1 <= v <= MAX_WORKER_TIMEOUT_S:
            raise ValueError(f"worker_timeout_s must be 0 (never) or in [1, {MAX_WORKER_TIMEOUT_S:g}] seconds, "
                             f"got {v!r}")
        return v


# Fields that lived in `training` before `resources` held them: a spec in that
# layout is told where each went.
MOVED_TO_RESOURCES = tuple(ResourcesSpec.model_fields)


class JobSpec(_Strict):
    name: str = Field("job", min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="before")
    @classmethod
    def _split_seed_defaults_to_seed(cls, raw: Any) -> Any:
        """data.split_seed left out is the job's seed: filled in here, so every
        JobSpec holds it and its JSON says which split it trains on."""
        if not isinstance(raw, dict):
            return raw
        seed, data = raw.get("seed", 0), raw.get("data")
        if not isinstance(seed, int) or isinstance(seed, bool):
            return raw  # refused as `seed` alone
        if isinstance(data, dict) and data.get("split_seed") is None:
            return {**raw, "data": {**data, "split_seed": seed}}
        if isinstance(data, DataSpec) and data.split_seed is None:
            return {**raw, "data": data.model_copy(update={"split_seed": seed})}
        return raw

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError(f"must be letters, digits, '.', '_' and '-', starting with a letter or digit "
                             f"(it names files), got {v!r:.80}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        t, d, r = self.training, self.data, self.resources
        if r.workers > d.shards:
            raise ValueError(
                f"resources.workers ({r.workers}) must be <= data.shards ({d.shards}): "
                "shards are the unit of work, a worker without one would idle"
            )
        if t.mode == "async" and r.parameter_servers != 1:
            raise ValueError(
                f"resources.parameter_servers ({r.parameter_servers}) must be 1 in async mode"
            )
        if t.batch_size < d.shards:
            raise ValueError(
                f"training.batch_size ({t.batch_size}) must be >= data.shards ({d.shards}): "
                "every shard contributes at least one row per step"
            )
        if d.source == "synthetic":
            n_train = d.samples - validation_rows(d.samples, d.validation_split)
            if n_train < d.shards:
                raise ValueError(
                    f"data.shards ({d.shards}) exceeds the training rows ({n_train}) of "
                    f"{d.samples} synthetic samples with validation_split {d.validation_split}"
                )
        return self

    def with_workers(self, workers: int) -> "JobSpec":
        """The same spec with another worker count, validated again."""
        raw = self.model_dump()
        raw["resources"]["workers"] = workers
        return parse_spec(raw)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def stop_step(spec: JobSpec) -> int:
    """How many steps this job makes: `training.stop_at` when set, else `training.steps`."""
    t = spec.training
    return t.steps if t.stop_at is None else t.stop_at


# Fields of `training` that say where a job stops, not what it computes: a
# checkpoint of a job stopped early is the same as an uninterrupted run's.
STOP_FIELDS = ("stop_at",)


def checkpoint_key(raw: dict) -> str:
    """A spec (as JSON data) as checkpoints name it: less its `resources`
    and `training.stop_at`, so a checkpoint resumes with any resources and
    any later stop, and nothing else changed; `data.split_seed` is part of
    it (it changes the data), left out when it is the job's seed so that
    checkpoints from before it existed resume. Specs stored before
    `resources` existed held its fields in `training` (the worker count as
    null); they are dropped there too, so those checkpoints keep resuming."""
    kept = {k: v for k, v in raw.items() if k != "resources"}
    data = kept.get("data")
    if isinstance(data, dict) and data.get("split_seed", kept.get("seed")) == kept.get("seed"):
        # the default split seed is written out only when it differs, as before it existed
        kept["data"] = {k: v for k, v in data.items() if k != "split_seed"}
    if isinstance(kept.get("training"), dict):
        dropped = (*MOVED_TO_RESOURCES, *STOP_FIELDS)
        kept["training"] = {k: v for k, v in kept["training"].items() if k not in dropped}
    return json.dumps(kept, sort_keys=True)


def _reject_non_finite(value: Any, path: str) -> None:
    """Refuse NaN/Inf anywhere, including spelled as strings ("nan", "-Infinity")."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{path or 'spec'}: numbers must be finite, got {value!r}")
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        raise SpecError(f"{path or 'spec'}: numbers must be finite, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_non_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_non_finite(v, f"{path}[{i}]")


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            moved = e["loc"][:-1] == ("training",) and e["loc"][-1] in MOVED_TO_RESOURCES
            msg = f"moved to resources.{e['loc'][-1]}" if moved else "unknown field"
        value = e.get("input")
        quiet = isinstance(value, (dict, list)) or e["type"] == "missing" or "got " in msg
        shown = "" if quiet else f" (got {value!r})"
        parts.append(f"{loc or 'spec'}: {msg}{shown}")
    return "; ".join(parts)


def parse_stored_spec(raw: Any) -> JobSpec:
    """A spec this project stored itself (a service's job store), perhaps
    before `resources` existed: fields found in `training` that moved there
    are moved, then it is validated as usual. Specs from users are never
    moved silently (parse_spec tells them where each field went)."""
    if isinstance(raw, dict) and isinstance(raw.get("training"), dict):
        training = dict(raw["training"])
        moved = {k: training.pop(k) for k in MOVED_TO_RESOURCES if k in training}
        if moved:
            raw = {**raw, "training": training, "resources": {**moved, **raw.get("resources", {})}}
    return parse_spec(raw)


def parse_spec(raw: Any) -> JobSpec:
    """Validate a spec given as a dict; raise SpecError naming the field and value."""
    if not isinstance(raw, dict):
        raise SpecError(f"spec must be a mapping of fields, got {type(raw).__name__}")
    _reject_non_finite(raw, "")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_errors(err)) from None


def load_spec(source: str | Path | dict | JobSpec) -> JobSpec:
    """A JobSpec from a JobSpec, a dict, or a path to a YAML/JSON file."""
    if isinstance(source, JobSpec):
        return source
    if isinstance(source, dict):
        return parse_spec(source)
    return parse_spec(read_document(Path(source), "spec", SpecError))


def read_document(path: Path, what: str, error: type[Exception]):
    """The YAML (or, for a .json file, JSON) document in `path`, as loaded;
    `error` naming the `what` file when it cannot be read or parsed."""
    try:
        text = path.read_text()
    except OSError as err:
        raise error(f"cannot read {what} file {str(path)!r}: {err.strerror}") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise error(f"{what} file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from None
