"""The service's settings: one typed object, from arguments and the environment.

Every field can also be set by a `SHARDPROP_*` environment variable
(`SHARDPROP_TOKEN`, `SHARDPROP_PORT`, `SHARDPROP_STORE_PATH`, ...); explicit
arguments win. Checkpoints and models live beside the store file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8470


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
    token: str | None = Field(None, repr=False, description="bearer token for mutating calls")
    max_concurrent_jobs: int = Field(1, ge=0, le=1024, description="0 pauses execution: jobs only queue")
    max_body_bytes: int = Field(1 << 20, gt=0)
    poll_interval_s: float = Field(0.2, gt=0, le=60)
    max_resumes: int = Field(3, ge=0, le=1000, description="a job found running at start is resumed at most this "
                             "many times, then failed (a job that kills the service cannot crash-loop it)")
    max_overtakes: int = Field(3, ge=0, le=1000, description="how many times later jobs may start ahead of a job "
                               "that waits for CPUs (backfill); 0 is strict first in first out")
    ray_connect_timeout_s: float = Field(5.0, gt=0, le=600, description="each step of connecting to Ray")
    ray_retry_s: float = Field(10.0, gt=0, le=3600, description="wait before connecting to Ray again after a failure")

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

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return v or None

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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
