"""Connecting to Ray: a private local instance by default, or a cluster.

A local run never attaches to some other Ray instance on the machine
(`address="local"`), keeps every port on loopback, and declares at least as
many logical CPUs as the job has workers so that an oversubscribed job runs
slowly instead of waiting forever for CPUs that do not exist.
"""

from __future__ import annotations

import os

import ray


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a private local Ray (address None) or attach to `address`.

    A no-op when this process is already connected, so tests and the service
    can share one instance."""
    if ray.is_initialized():
        return
    # Worker processes import shardprop from the same checkout as the driver.
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}}
    if address is None:
        cores = os.cpu_count() or 1
        ray.init(
            address="local",
            num_cpus=max(cores, num_cpus or 0),
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)


def cluster_cpus() -> float:
    """Logical CPUs the connected cluster has in all."""
    return float(ray.cluster_resources().get("CPU", 0.0))
