"""A job spec as the client takes it: a mapping, a YAML/JSON file's path, or
YAML/JSON text. The service validates it; here it only has to be a mapping."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import yaml

from service.client.errors import ShardpropError


class SpecFileError(ShardpropError):
    """The spec could not be read or is not a mapping (nothing was sent)."""


def load_spec(spec: Mapping | str | os.PathLike) -> dict:
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_a_path(spec)):
        return load_spec_file(os.fspath(spec))
    if not isinstance(spec, str):
        raise SpecFileError(f"a job spec is a mapping, a file path or YAML text, got {type(spec).__name__}")
    return _mapping(_parse(spec, "the spec text", json_first=False), "the spec text")


def load_spec_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SpecFileError(f"cannot read {path}: {err.strerror}") from None
    return _mapping(_parse(text, path, json_first=path.lower().endswith(".json")), path)


def _looks_like_a_path(text: str) -> bool:
    """One line ending in .yaml/.yml/.json, or naming a file that exists."""
    if "\n" in text:
        return False
    if text.lower().endswith((".yaml", ".yml", ".json")):
        return True
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long for a file name, a NUL
        return False


def _parse(text: str, where: str, json_first: bool):
    try:
        return json.loads(text) if json_first else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise SpecFileError(f"{where} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None


def _mapping(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise SpecFileError(f"{where}: a job spec is a mapping of fields, got {type(raw).__name__}")
    return raw
