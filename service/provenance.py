"""A job's provenance: the code that runs it, its spec and its data, each as
a fingerprint stored with the job when it is submitted.

The code version is the package's version and, when the service runs from
a git checkout, `git describe --always --dirty` of it: found once, at
service start. The spec's fingerprint is the SHA-256 of its canonical JSON
(key order, spacing and spelled-out defaults do not change it); the data's
is core.provenance's. The parameters' fingerprints are in the step records
(`params_sha256`), and the failure timeline is the job's events.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from core.provenance import data_sha256
from core.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
GIT_WAIT_S = 5.0


@lru_cache(maxsize=1)
def code_version() -> str:
    """"<package version>", plus " git <describe>" from a git checkout."""
    try:
        version = metadata.version("shardprop")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        found = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                               capture_output=True, text=True, timeout=GIT_WAIT_S)
    except (OSError, subprocess.TimeoutExpired):
        return version
    described = found.stdout.strip()
    return f"{version} git {described}" if found.returncode == 0 and described else version


def spec_sha256(spec: JobSpec) -> str:
    """The same for the same job, however its JSON was written: key order,
    spacing, `1` or `1.0`, defaults left out or spelled out."""
    return hashlib.sha256(spec.to_json().encode()).hexdigest()


def job_provenance(spec: JobSpec, settings) -> dict:
    return {"code_version": code_version(), "spec_sha256": spec_sha256(spec),
            "data_sha256": job_data_sha256(spec, settings)}


def job_data_sha256(spec: JobSpec, settings) -> str:
    """core.provenance's fingerprint of the job's data, within the service's roots and limits."""
    return data_sha256(spec.data, [str(r) for r in settings.data_roots], spec.training.dtype,
                       settings.data_limits())
