"""`Sweep`: a handle on one sweep of a service.

    sweep = client.submit_sweep("examples/digits-sweep.yaml")
    sweep.wait(on_progress=lambda s: print(s["leaderboard"][0]))
    sweep.best_model("best.npz")     # the best trial's model, as `shardprop model` writes it

A sweep's status carries its leaderboard (each trial: its values, its
objective, its state, the steps it ran) and `best`, the trial that leads
with the job whose model is the trial's. What follows a sweep rides out a
restarting service, as `Job.wait` does.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from service.client.errors import Conflict, JobCancelled, JobFailed, Timeout
from service.states import TERMINAL


class Sweep:
    def __init__(self, client, sweep_id: str, info: dict | None = None):
        self.client, self.id = client, sweep_id
        self.info = info or {}  # as last read

    def __repr__(self) -> str:
        return f"Sweep({self.id!r}, state={self.info.get('state')!r})"

    def status(self) -> dict:
        """The sweep now: state, leaderboard, best trial, trials by state."""
        self.info = self.client.sweep_status(self.id, retry=True)
        return self.info

    @property
    def leaderboard(self) -> list[dict]:
        return self.status()["leaderboard"]

    def wait(self, timeout: float | None = None, on_progress: Callable[[dict], None] | None = None,
             interval: float = 1.0) -> dict:
        """Wait for the sweep to end; its final status when it succeeded,
        JobFailed / JobCancelled otherwise, Timeout after `timeout` seconds.
        `on_progress(status)` is called at every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if on_progress is not None:
                on_progress(status)
            if status["state"] in TERMINAL:
                return _ended(status)
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"sweep {self.id} is still {status['state']} after {timeout:g} s")
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    def cancel(self) -> dict:
        self.info = self.client.cancel_sweep(self.id)
        return self.info

    def best_model(self, path: str | os.PathLike | None = None):
        """The best trial's trained model (bytes, or written to `path`); Conflict while none has one."""
        from service.client.job import Job

        best = self.status().get("best")
        if best is None:
            raise Conflict(f"sweep {self.id} has no trial with a model yet", 409)
        return Job(self.client, best["job_id"]).model(path)


def _ended(status: dict) -> dict:
    if status["state"] == "succeeded":
        return status
    if status["state"] == "cancelled":
        raise JobCancelled(f"sweep {status['id']} was cancelled", status)
    raise JobFailed(f"sweep {status['id']} failed: {status.get('error') or 'no reason given'}", status)
