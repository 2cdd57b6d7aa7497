"""The service's settings: one typed object, from arguments and the environment.

Every field can also be set by a `SHARDPROP_*` environment variable
(`SHARDPROP_TOKEN`, `SHARDPROP_PORT`, `SHARDPROP_STORE_PATH`, ...); explicit
arguments win. Checkpoints and models live beside the store file.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.datafiles import DataLimits

DEFAULT_PORT = 8470
GiB = 1 << 30
_DATA = DataLimits()  # the loader's defaults: the limits a worker enforces again
# The admission limits (docs/service.md, "Admission"); `serve --limit NAME=VALUE` sets any of them.
LIMITS = ("max_parameters", "max_data_bytes", "max_inflation", "max_rows", "max_features", "max_classes",
          "prepare_above_bytes",
          "max_worker_bytes", "max_service_bytes", "max_job_bytes", "max_steps", "max_evaluations",
          "max_checkpoints", "max_predict_values")


def default_store_path() -> Path:
    return Path.home() / ".shardprop" / "shardprop.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHARDPROP_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    store_path: Path = Field(default_factory=default_store_path, description="the SQLite job store")
    data_roots: list[Path] = Field(default_factory=lambda: [Path.cwd()],
                                   description="folders data paths in specs are confined to")
    ray_address: str | None = None
    token: str | None = Field(None, repr=False, description="bearer token for every call that changes or reveals jobs")
    allowed_hosts: list[str] = Field(default_factory=list,
                                     description="Host names (NAME or NAME:PORT) answered besides the bind address")
    max_concurrent_jobs: int = Field(1, ge=0, le=1024, description="0 pauses execution: jobs only queue")
    max_body_bytes: int = Field(1 << 20, gt=0)
    poll_interval_s: float = Field(0.2, gt=0, le=60)
    max_resumes: int = Field(3, ge=0, le=1000, description="a job found running at start is resumed at most this "
                             "many times, then failed (a job that kills the service cannot crash-loop it)")
    max_overtakes: int = Field(3, ge=0, le=1000, description="how many times later jobs may start ahead of a job "
                               "that waits for CPUs (backfill); 0 is strict first in first out")
    ray_connect_timeout_s: float = Field(5.0, gt=0, le=600, description="each step of connecting to Ray")
    ray_retry_s: float = Field(10.0, gt=0, le=3600, description="wait before connecting to Ray again after a failure")

    # Admission limits, sized for one machine of 24 GiB and 2 cores.
    max_parameters: int = Field(50_000_000, gt=0, description="network parameters, over all layers")
    max_data_bytes: int = Field(_DATA.max_data_bytes, gt=0, description="a data set as loaded (float64)")
    max_inflation: float = Field(_DATA.max_inflation, gt=1,
                                 description="an .npz member's uncompressed / compressed size")
    max_rows: int = Field(_DATA.max_rows, gt=0)
    max_features: int = Field(_DATA.max_features, gt=0)
    max_classes: int = Field(_DATA.max_classes, ge=2)
    prepare_above_bytes: int = Field(_DATA.prepare_above_bytes, ge=0, description="a .csv or .npz source "
                                     "larger than this is prepared once into the cache, not loaded whole")
    max_worker_bytes: int = Field(4 * GiB, gt=0, description="estimated peak memory of one gradient worker")
    max_service_bytes: int = Field(4 * GiB, gt=0, description="estimated peak memory of a job's coordinator")
    max_job_bytes: int = Field(16 * GiB, gt=0, description="estimated peak memory of a job's processes together")
    max_steps: int = Field(10_000_000, gt=0)
    max_evaluations: int = Field(100_000, ge=2, description="validation passes per job")
    max_checkpoints: int = Field(10_000, ge=2, description="checkpoints written per job")
    max_predict_values: int = Field(10_000_000, gt=0, description="predict rows x the model's widest layer")

    @field_validator("store_path")
    @classmethod
    def _store(cls, v: Path) -> Path:
        return Path(v).expanduser().absolute()

    @field_validator("data_roots")
    @classmethod
    def _roots(cls, v: list[Path]) -> list[Path]:
        if not v:
            raise ValueError("at least one data root is needed")
        # absolute: Ray workers do not share the service's cwd
        return [Path(p).expanduser().resolve() for p in v]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            if not re.fullmatch(r"[A-Za-z0-9._-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
                raise ValueError(f"an allowed host is a name or address with an optional :port "
                                 f"(like ray-head or ray-head:8470), got {host!r}")
        return [h.lower() for h in v]

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return v or None

    def data_limits(self) -> DataLimits:
        return DataLimits(max_data_bytes=self.max_data_bytes, max_inflation=self.max_inflation,
                          max_rows=self.max_rows, max_features=self.max_features, max_classes=self.max_classes,
                          prepare_above_bytes=self.prepare_above_bytes)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.store_path.parent

    @property
    def checkpoints_dir(self) -> Path:
        return self.store_dir / "checkpoints"

    @property
    def models_dir(self) -> Path:
        return self.store_dir / "models"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.checkpoints_dir / job_id

    def model_path(self, job_id: str) -> Path:
        return self.models_dir / f"{job_id}.npz"


MIN_TOKEN_LENGTH, MIN_TOKEN_VARIETY = 16, 8


def token_weakness(token: str) -> str | None:
    """Why `token` is too weak to guard a service beyond loopback, or None:
    fewer than 16 characters, or fewer than 8 different ones."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"it has {len(token)} characters, at least {MIN_TOKEN_LENGTH} are needed"
    if len(set(token)) < MIN_TOKEN_VARIETY:
        return f"it has {len(set(token))} different characters, at least {MIN_TOKEN_VARIETY} are needed"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
