"""Checkpoints: everything needed to continue a job, as plain arrays.

A checkpoint holds the parameters, the optimizer state, the step, the spec
and the job's counters. The data position needs no field of its own: a
shard's place in its data is a function of the step (see core.shards). Files
are written atomically (temporary file, fsync, rename) and carry a SHA-256 of
their contents, checked on load; they are never unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.trainer import TrainingError

PREFIX, SUFFIX = "ckpt-", ".npz"
KEEP = 3  # older checkpoints are pruned; a few are kept in case the newest is damaged


class CheckpointError(ValueError):
    """A checkpoint file that is damaged or incomplete."""


@dataclass
class Checkpoint:
    step: int  # updates processed; the parameters are those of version `step`
    params: np.ndarray
    optimizer: dict[str, np.ndarray]
    spec_json: str
    counters: dict = field(default_factory=dict)  # skipped steps, non-finite streak, ...


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def path_for(directory: Path, step: int) -> Path:
    return Path(directory) / f"{PREFIX}{step:09d}{SUFFIX}"


def write_checkpoint(directory: Path, ckpt: Checkpoint) -> Path:
    """Write atomically and prune old ones; returns the final path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "step": np.array(ckpt.step, dtype=np.int64),
        "params": ckpt.params,
        "spec_json": np.array(ckpt.spec_json),
        "counters_json": np.array(json.dumps(ckpt.counters, sort_keys=True)),
        **{f"opt.{k}": v for k, v in ckpt.optimizer.items()},
    }
    arrays["sha256"] = np.array(_digest(arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    final = path_for(directory, ckpt.step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:  # a full disk (ENOSPC), an interrupt: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint; CheckpointError if damaged."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as err:  # a torn or corrupted zip raises many kinds of error
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    stored = arrays.pop("sha256", None)
    if stored is None or str(stored) != _digest(arrays):
        raise CheckpointError(f"{path}: checksum mismatch")
    return Checkpoint(
        step=int(arrays["step"]),
        params=arrays["params"],
        optimizer={k.removeprefix("opt."): v for k, v in arrays.items() if k.startswith("opt.")},
        spec_json=str(arrays["spec_json"]),
        counters=json.loads(str(arrays["counters_json"])),
    )


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in a folder, oldest first (temporary files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{PREFIX}*{SUFFIX}") if p.is_file())


def latest_checkpoint(directory: Path, on_damaged=None) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path)
        except CheckpointError as err:
            if on_damaged is not None:
                on_damaged(path, err)
    return None


def copy_checkpoint(source: Path, destination: Path, step: int) -> Path:
    """Give a continuation job (a sweep's promotion) the checkpoint of step
    `step` from the job it continues: verified, then written atomically into
    its own folder, where `Coordinator.run(resume=True)` finds it."""
    path = path_for(source, step)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint of step {step} to continue from")
    return write_checkpoint(destination, read_checkpoint(path))


class JobCheckpoints:
    """One job's checkpoints: written with the job's key and counters, read
    back only if they belong to the same job (same key), damaged ones
    reported and skipped."""

    def __init__(self, directory: Path, key: str, key_of_stored, on_written, on_damaged):
        self.directory = Path(directory)
        self.key = key  # the spec less what may change on resume (core.spec)
        self._key_of_stored = key_of_stored  # a stored spec's key by today's rule
        self._on_written, self._on_damaged = on_written, on_damaged

    def write(self, step: int, params: np.ndarray, optimizer: dict, counters: dict) -> Path:
        """Write one checkpoint; a disk that refuses it (full, read-only)
        ends the job with a TrainingError naming the folder and the reason."""
        try:
            path = write_checkpoint(self.directory, Checkpoint(step, params, dict(optimizer), self.key, counters))
        except OSError as err:
            reason = (err.strerror or str(err)).lower()
            raise TrainingError(f"cannot write the checkpoint of step {step} in {self.directory}: {reason}") from None
        self._on_written(step, path)
        return path

    def latest(self) -> Checkpoint | None:
        ckpt = latest_checkpoint(self.directory, on_damaged=self._on_damaged)
        if ckpt is not None and self._key_of_stored(ckpt.spec_json) != self.key:
            raise TrainingError(f"the checkpoints in {self.directory} belong to a different job spec")
        return ckpt
