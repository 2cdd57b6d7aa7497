"""`Job`: a handle on one job of a service, for notebooks and scripts.

    job = client.submit("examples/digits.yaml")
    job.wait(timeout=600, on_progress=lambda s: print(s["step"], "/", s["steps"]))
    frame = job.dataframe()            # one row per step (pandas)
    for event in job.events():         # its timeline: state changes, failures, recoveries
        print(event["seq"], event["kind"], event["step"])

What follows a job (`wait`, `events`, `metrics`) rides out a dropped
connection or a restarting service (see service.client.connection). The
events generator keeps a cursor, the `seq` of the last event it gave: a
service numbers a job's events once and for all, so asking again from the
cursor gives every event exactly once, whatever happened in between.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

from service.client.errors import JobCancelled, JobFailed, Timeout
from service.states import TERMINAL


class Job:
    def __init__(self, client, job_id: str, info: dict | None = None):
        self.client, self.id = client, job_id
        self.info = info or {}  # as last read: the answer to submit, or to the last status()

    def __repr__(self) -> str:
        return f"Job({self.id!r}, state={self.info.get('state')!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Job) and (other.client.server, other.id) == (self.client.server, self.id)

    def __hash__(self) -> int:
        return hash((self.client.server, self.id))

    # ------------------------------------------------------------ reading

    def status(self) -> dict:
        """The job now: state, step, spec, provenance, transitions, latest metrics."""
        self.info = self.client.status(self.id, retry=True)
        return self.info

    @property
    def state(self) -> str:
        return self.status()["state"]

    @property
    def provenance(self) -> dict | None:
        """Code version, spec and data SHA-256, as stored at submit."""
        return self.status().get("provenance")

    def wait(self, timeout: float | None = None, on_progress: Callable[[dict], None] | None = None,
             interval: float = 0.5) -> dict:
        """Wait for the job to end; returns its final status when it
        succeeded, raises JobFailed / JobCancelled (with the service's
        message) otherwise, and Timeout after `timeout` seconds.
        `on_progress(status)` is called whenever the step, the state, what
        a queued job waits for or a running job's `phase` changes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            status = self.status()
            now = (status["state"], status["step"], status.get("waiting_for"), status.get("phase"))
            if on_progress is not None and now != seen:
                seen = now
                on_progress(status)
            if status["state"] in TERMINAL:
                return _ended(status)
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"job {self.id} is still {status['state']} at step {status['step']}/"
                              f"{status['steps']} after {timeout:g} s")
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    def metrics(self, since: int = 0, *, as_frame: bool = False):
        """The history: one record per step after `since` (list of dicts), or
        with `as_frame` a pandas DataFrame indexed by step."""
        records = self.client.metrics(self.id, since, retry=True)
        return _frame(records) if as_frame else records

    def dataframe(self, since: int = 0):
        return self.metrics(since, as_frame=True)

    def events(self, since: int = 0, follow: bool = True, interval: float = 0.5) -> Iterator[dict]:
        """The job's events numbered after `since`, in order, each exactly
        once. With `follow`, goes on until the job has ended and its last
        event was given; without, stops at the last event stored now."""
        cursor = since
        while True:
            page = self.client.events_page(self.id, cursor, retry=True)
            for event in page["events"]:
                cursor = event["seq"]
                yield event
            if page["more"]:
                continue
            if not follow:
                return
            if self.status()["state"] in TERMINAL:
                # the final state's event is stored with the state: one more page has it
                for event in self._rest(cursor):
                    yield event
                return
            time.sleep(interval)

    def _rest(self, cursor: int) -> Iterator[dict]:
        while True:
            page = self.client.events_page(self.id, cursor, retry=True)
            for event in page["events"]:
                cursor = event["seq"]
                yield event
            if not page["more"]:
                return

    # ------------------------------------------------------------ acting

    def cancel(self) -> dict:
        self.info = self.client.cancel(self.id)
        return self.info

    def resize(self, workers: int) -> dict:
        self.info = self.client.resize(self.id, workers)
        return self.info

    def model(self, path: str | os.PathLike | None = None):
        """The trained model file: its bytes, or written to `path` (whole or
        not at all) and the path returned."""
        data = self.client.model(self.id)
        if path is None:
            return data
        out = Path(path)
        part = out.with_name(out.name + ".part")
        part.write_bytes(data)
        os.replace(part, out)
        return out

    def predict(self, rows) -> dict:
        return self.client.predict(self.id, rows)


def _ended(status: dict) -> dict:
    if status["state"] == "succeeded":
        return status
    if status["state"] == "cancelled":
        raise JobCancelled(f"job {status['id']} was cancelled", status)
    raise JobFailed(f"job {status['id']} failed at step {status['step']}: {status.get('error') or 'no reason given'}",
                    status)


def _frame(records: list[dict]):
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("Job.metrics(as_frame=True) and Job.dataframe() need pandas: "
                          "pip install pandas (or shardprop[client])") from None
    frame = pd.DataFrame.from_records(records)
    return frame.set_index("step") if "step" in frame else frame
