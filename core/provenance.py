"""Fingerprints of what a run is made of: its data and its parameters.

`params_sha256` is the SHA-256 of the flat parameter vector's bytes (its
dtype and length are fixed by the spec), so two runs whose hashes agree at a
step hold the same bits there. Both trainers record it at every evaluation
and checkpoint step (`records_params`), which makes their histories
comparable step by step (`shardprop diff`).

`data_sha256` is the SHA-256 of the data a spec names: a file's bytes, read
in bounded chunks; for a built-in set, of its arrays as loaded (float64 X,
int64 y); for a synthetic set, of the data spec itself, since the data is a
pure function of it. A prepared data set is fingerprinted by its manifest,
which holds the SHA-256 of every file: a prepared folder, `s3://...`, and
a large raw source once its cached copy is made (until then, its bytes);
so one job on a big CSV and another on the same CSV prepared by hand with
the same split record the same data. A new kind of data gets a case here.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.data import _builtin, resolve_data_path
from core.datafiles import DataLimits
from core.spec import BUILTIN_SOURCES, DataSpec, JobSpec, stop_step

CHUNK = 1 << 20


def params_sha256(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params).tobytes()).hexdigest()


def records_params(spec: JobSpec, step: int) -> bool:
    """Whether the record of update `step` (0-based) carries params_sha256:
    evaluation steps (every eval_every, and the last) and checkpoint steps
    (every checkpoint_every, before the last). The last is the job's stop
    (`training.stop_at`, else `training.steps`)."""
    t, done, last = spec.training, step + 1, stop_step(spec)
    evaluated = done == last or (t.eval_every > 0 and done % t.eval_every == 0)
    return evaluated or (t.checkpoint_every > 0 and done % t.checkpoint_every == 0 and done < last)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_sha256(spec: DataSpec, data_roots: list[str | Path] | None = None, dtype: str = "float32",
                limits: DataLimits = DataLimits()) -> str:
    """The fingerprint of the data `spec` names (see the module's text)."""
    from core.data_source import NotPrepared, resolve, source_sha256

    if spec.source == "synthetic":
        return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    if spec.source in BUILTIN_SOURCES:
        return _builtin_sha256(spec.source)
    try:
        prepared = resolve(spec, dtype=dtype, data_roots=data_roots, limits=limits, prepare=False)
    except NotPrepared:
        return source_sha256(resolve_data_path(spec.source, data_roots))
    if prepared is not None:
        return prepared.manifest_sha256
    return file_sha256(resolve_data_path(spec.source, data_roots))


@lru_cache(maxsize=None)
def _builtin_sha256(name: str) -> str:
    X, y = _builtin(name)
    digest = hashlib.sha256(np.ascontiguousarray(X).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
