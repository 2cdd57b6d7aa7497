"""The service's connection to Ray: made when the first job is about to run,
with a bounded wait, and tried again later when it fails.

`ensure()` is called by the scheduler loop. An address is probed first
(`workers.runtime.probe_ray`: a TCP connect and a gRPC handshake, each within
`ray_connect_timeout_s`), then `ray.init` runs in a thread of its own, waited
for at most as long again: `ray.init` cannot be interrupted, so a call that
has not returned by then is left running and looked at again on the next
try, never started twice. A private local instance is started in the
caller's thread, without a bound (its processes die with the thread that
started them; it has no address that could be wrong). A failure logs one line ("cannot connect to Ray at
ADDR: REASON; retrying in N s") and `status` says `unreachable: REASON`
until a later try succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("shardprop.scheduler")

HEAD_PROBE_EVERY_S = 2.0
HEAD_PROBE_TIMEOUT_S = 2.0


class RayConnection:
    def __init__(self, address: str | None, timeout_s: float, retry_s: float,
                 on_connected: Callable[[], None] | None = None):
        self.address, self.timeout_s, self.retry_s = address, timeout_s, retry_s
        self.on_connected = on_connected
        self.connected = False
        self.error: str | None = None  # why the last try failed
        self.attempts = 0  # tries made (one try may wait for a ray.init still under way)
        self._attempt: threading.Thread | None = None
        self._outcome: dict = {}
        self._next_try = 0.0
        self._probe_lock = threading.Lock()  # health checks come from several request threads
        self._probed_at = float("-inf")
        self._head_error: str | None = None  # why the connected cluster's head did not answer, last asked

    @property
    def where(self) -> str:
        return self.address or "a private local instance"

    def status(self) -> str:
        """What `/healthz` says of Ray. Once connected to a cluster, whether
        its head (the GCS) still answers is asked again, at most every
        HEAD_PROBE_EVERY_S and within HEAD_PROBE_TIMEOUT_S: a head cut off
        from the service reads `unreachable: REASON` instead of jobs
        silently waiting."""
        if self.connected and self.address is not None:
            return self._head_status()
        if self.connected:
            return "connected"
        if self.error is not None:
            return f"unreachable: {self.error}"
        return "not connected yet (connects when a job is about to run)"

    def _head_status(self) -> str:
        from workers.runtime import RayUnreachable, probe_ray

        with self._probe_lock:
            if time.monotonic() - self._probed_at >= HEAD_PROBE_EVERY_S:
                try:
                    probe_ray(self.address, min(self.timeout_s, HEAD_PROBE_TIMEOUT_S))
                    self._head_error = None
                except RayUnreachable as err:
                    self._head_error = str(err)
                self._probed_at = time.monotonic()
            return "connected" if self._head_error is None else f"unreachable: {self._head_error}"

    def ensure(self) -> bool:
        """Whether Ray is connected, trying (for a bounded time) if it is
        not and the last failure is `retry_s` old."""
        if self.connected:
            return True
        if time.monotonic() < self._next_try:
            return False
        self.attempts += 1
        if self.address is None:
            # A private instance's processes are started with a parent-death
            # signal that fires when the *thread* that started them ends, so
            # they are started from the caller's own (long-lived) thread.
            self._outcome = {}
            self._connect()
        else:
            if self._attempt is None:  # else: the last try's ray.init has not returned yet; wait for it again
                self._outcome = {}
                self._attempt = threading.Thread(target=self._connect, name="shardprop-ray-connect", daemon=True)
                self._attempt.start()
            # the probe (up to twice timeout_s: connect, then handshake), then ray.init (timeout_s)
            self._attempt.join(3 * self.timeout_s)
            if self._attempt.is_alive():
                self._failed(f"ray.init did not return within {3 * self.timeout_s:g} s")
                return False
            self._attempt = None
        if "error" in self._outcome:
            self._failed(self._outcome["error"])
            return False
        self.connected, self.error = True, None
        log.info("connected to Ray at %s", self.where)
        if self.on_connected is not None:
            try:
                self.on_connected()
            except RuntimeError:  # the service's event loop is closing: it is stopping anyway
                pass
        return True

    def _connect(self) -> None:
        from workers.runtime import connect_ray, probe_ray

        try:
            if self.address is not None:
                probe_ray(self.address, self.timeout_s)
            connect_ray(self.address)
        except Exception as err:  # any failure is a reason to report and try again
            self._outcome["error"] = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__

    def _failed(self, reason: str) -> None:
        self._next_try = time.monotonic() + self.retry_s
        if reason != self.error:
            log.error("cannot connect to Ray at %s: %s; retrying in %g s", self.where, reason, self.retry_s)
        self.error = reason
