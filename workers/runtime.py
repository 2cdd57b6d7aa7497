"""Connecting to Ray: a private local instance by default, or a cluster.

A local run never attaches to some other Ray instance on the machine
(`address="local"`), names its node 127.0.0.1 and keeps Ray's dashboard on
loopback, and declares at least as many logical CPUs as the job has workers
so that an oversubscribed job runs slowly instead of waiting forever for CPUs
that do not exist. Ray 2.60's own servers (GCS, raylet, workers) still listen
on every interface, as seen here with `ss -ltnp`; Ray's token authentication,
on by default since 2.5x, is what guards them, so leave it on.

`ray.init` against an address where something listens but is not Ray
waits for minutes (measured: still waiting after 70 s, logging only "Failed
to connect to GCS"), so `probe_ray` asks first, with a bounded wait, whether
a gRPC server (Ray's GCS) answers there.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

import ray

from workers import shared

T = TypeVar("T")

_started_node: str | None = None  # the driver's node ID in the Ray instance this process started


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a private local Ray (address None) or attach to `address`.

    A no-op when this process is already connected, so tests and the service
    can share one instance."""
    global _started_node
    if ray.is_initialized():
        return
    # Worker processes import shardprop from the same checkout as the driver.
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}}
    if address is None:
        # What earlier, now dead, local instances left in shared memory.
        shared.sweep_dead_ray_semaphores()
        shared.sweep_stale()
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
        _started_node = ray.get_runtime_context().get_node_id()
    else:
        _started_node = None
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)


class RayUnreachable(RuntimeError):
    """Nothing at a Ray address answers as Ray's GCS does."""


def probe_ray(address: str, timeout_s: float) -> None:
    """Raise RayUnreachable, with the reason, unless a TCP connection to
    `address` (HOST:PORT) opens and a gRPC handshake completes there within
    `timeout_s`. Addresses of other forms ("auto", "ray://...") are left to
    Ray."""
    import socket

    import grpc

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise RayUnreachable(str(err.strerror or err).lower()) from None
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise RayUnreachable(f"a connection opens but no gRPC handshake (Ray's GCS) completed within "
                             f"{timeout_s:g} s: is it Ray?") from None
    finally:
        channel.close()


def started_here() -> bool:
    """Whether the connected Ray instance is the private one this process
    started (connect_ray without an address), rather than a cluster or an
    instance someone else started."""
    return ray.is_initialized() and _started_node is not None and \
        ray.get_runtime_context().get_node_id() == _started_node


ALIVE_TIMEOUT_S = 30.0  # how long an actor may take to answer before it counts as gone


def kill_actor(actor) -> None:
    """Kill an actor for good; nothing happens if it is gone already."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def cluster_cpus() -> float:
    """Logical CPUs the connected cluster has in all."""
    return float(ray.cluster_resources().get("CPU", 0.0))


LOWEST_PRIORITY = 19


def run_at_low_priority(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` in a thread of its own at the lowest CPU priority; its result
    or its exception is this call's.

    A compiled Ray graph's driver waits for a result by polling shared memory.
    Ray runs its worker processes at a lower priority (nice 15) than drivers,
    so on a machine with as many cores as workers a polling driver at normal
    priority would take a core from a computing worker, and measured here it
    halves the workers' speed. Only the new thread is reniced (Linux
    priorities are per thread): the caller, and the HTTP server or progress
    bar beside it, keep theirs."""
    outcome: dict = {}

    def body() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)
        except (OSError, AttributeError):  # not Linux, or not permitted: slower, still right
            pass
        try:
            outcome["value"] = fn(*args)
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=body, name="shardprop-steps", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # a timed join keeps the caller's Ctrl-C deliverable
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
