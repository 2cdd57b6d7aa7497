"""The service's settings: one typed object, from arguments and the environment."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PORT = 8470


def default_store_path() -> Path:
    return Path.home() / ".shardprop" / "shardprop.db"


class Settings(BaseModel):
    """Everything `shardprop serve` can be told. The token comes from
    SHARDPROP_TOKEN unless given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    store_path: Path = Field(default_factory=default_store_path)
    data_roots: list[Path] = Field(default_factory=lambda: [Path.cwd()])
    ray_address: str | None = None
    token: str | None = Field(default_factory=lambda: os.environ.get("SHARDPROP_TOKEN") or None)
    max_concurrent_jobs: int = Field(1, ge=0, le=1024, description="0 pauses execution: jobs only queue")
    max_body_bytes: int = Field(1 << 20, gt=0)
    poll_interval_s: float = Field(0.2, gt=0)

    @property
    def store_dir(self) -> Path:
        return Path(self.store_path).parent

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
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
