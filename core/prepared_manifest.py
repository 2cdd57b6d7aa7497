"""The manifest of a prepared data set: its names and the checks a reader relies on.

`check_manifest` refuses, naming the manifest and the field, anything a
reader would trip on: a missing or mistyped field, statistics of the wrong
length, and a file list that is not exactly the blocks the row counts and
`block_rows` call for (so no listed path can point outside the set).
"""

from __future__ import annotations

import math
import re

from core.datafiles import DataError

FORMAT = "shardprop-prepared/1"
MANIFEST = "manifest.json"
EVAL_BLOCK_ROWS = 4096
BLOCK_NAME = re.compile(r"(train|val)/([Xy])-(\d{5})\.npy")
SPLITS = {"train": "train", "validation": "val"}  # the manifest's rows key -> the folder


def block_name(split: str, kind: str, index: int) -> str:
    """The path of block `index` of a split ("train"/"val"), kind "X" or "y"."""
    return f"{split}/{kind}-{index:05d}.npy"


def _field(manifest: dict, where: str, key: str, kind, check=lambda v: True, what: str = ""):
    value = manifest.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not check(value):
        raise DataError(f"{where}: field {key!r} is missing or not {what or kind.__name__}")
    return value


def check_manifest(manifest, where: str) -> None:
    """Every field a reader relies on, checked; DataError naming the field."""
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: field 'format' is not {FORMAT!r}")
    task = manifest.get("task")
    if task not in ("classification", "regression"):
        raise DataError(f"{where}: field 'task' must be classification or regression")
    features = _field(manifest, where, "features", int, lambda v: v > 0, "a positive int")
    if task == "classification":
        _field(manifest, where, "classes", int, lambda v: v >= 2, "an int >= 2")
    else:
        _field(manifest, where, "targets", int, lambda v: v >= 1, "a positive int")
    if manifest.get("dtype") not in ("float32", "float64"):
        raise DataError(f"{where}: field 'dtype' must be float32 or float64")
    _field(manifest, where, "block_rows", int, lambda v: v > 0, "a positive int")
    _field(manifest, where, "eval_block_rows", int, lambda v: v > 0, "a positive int")
    split = _field(manifest, where, "split", dict)
    if not isinstance(split.get("seed"), int) or not isinstance(split.get("validation_split"), (int, float)):
        raise DataError(f"{where}: field 'split' needs an int 'seed' and a number 'validation_split'")
    rows = _field(manifest, where, "rows", dict)
    for key in ("train", "validation"):
        if not isinstance(rows.get(key), int) or isinstance(rows.get(key), bool) or rows[key] < 0:
            raise DataError(f"{where}: field 'rows.{key}' is missing or not an int >= 0")
    if rows["train"] < 1:
        raise DataError(f"{where}: field 'rows.train' must be at least 1")
    stats = _field(manifest, where, "standardization", dict)
    for key in ("mean", "scale"):
        values = stats.get(key)
        if not (isinstance(values, list) and len(values) == features
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise DataError(f"{where}: field 'standardization.{key}' must be {features} finite numbers")
    if any(v <= 0 for v in stats["scale"]):
        raise DataError(f"{where}: field 'standardization.scale' must be positive")
    files = _field(manifest, where, "files", list)
    expected = {block_name(folder, kind, i)
                for split_key, folder in SPLITS.items()
                for i in range(math.ceil(rows[split_key] / manifest["block_rows"])) for kind in "Xy"}
    listed = set()
    for entry in files:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise DataError(f"{where}: field 'files' holds an entry without path, bytes and sha256")
        if not BLOCK_NAME.fullmatch(entry["path"]) or entry["path"] in listed:
            raise DataError(f"{where}: field 'files' lists {entry['path'][:80]!r}, not a block of this set")
        listed.add(entry["path"])
    if listed != expected:
        missing = sorted(expected - listed)
        extra = sorted(listed - expected)
        raise DataError(f"{where}: field 'files' does not match the rows and block_rows: "
                        + (f"{missing[0]} is not listed" if missing else f"{extra[0]} is one too many"))
