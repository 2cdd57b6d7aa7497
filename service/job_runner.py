"""One running job: its Coordinator driven to the end in a thread of the
scheduler, how the end maps to a final state, and recording that state in
the store, retried until the store takes it.

A job's end must reach the store: a job left `running` with nothing running
it would be resumed at the next start, and in the meantime says something
false. A store whose disk is full (or failing) refuses the write; it is tried
again with a growing wait (0.1 s, doubling, at most 5 s) until it succeeds or
the service stops.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from service.store import IllegalTransition, NotFound, Store, StoreUnavailable

log = logging.getLogger("shardprop.scheduler")

FIRST_RETRY_S, LAST_RETRY_S = 0.1, 5.0


@dataclass
class Active:
    job_id: str
    coordinator: object
    thread: threading.Thread | None = None
    cpus: int = 0
    cancel_requested: bool = False
    resized: threading.Event = field(default_factory=threading.Event)  # set at each Resized event


class Outcome(NamedTuple):
    state: str
    reason: str
    error: str | None = None


def run_to_end(active: Active, resume: bool, model_path: Path, stopping: threading.Event,
               prepare: Callable[[], bool] | None = None) -> Outcome | None:
    """Run the job's coordinator; the state it ends in, or None when the
    service is stopping (the job stays `running` and resumes at the next start).
    `prepare()` readies the job's checkpoints first (a sweep's promotion
    gets its rung before's); True: resume from them."""
    from core.trainer import TrainingError
    from workers.coordinator import JobCancelled

    try:
        if prepare is not None and prepare():
            resume = True
        net = active.coordinator.run(resume=resume)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        net.save(model_path)
        return Outcome("succeeded", "finished")
    except JobCancelled:
        if active.cancel_requested or not stopping.is_set():
            return Outcome("cancelled", "cancelled by request")
        return None
    except (TrainingError, ValueError) as err:
        return Outcome("failed", "error", str(err))
    except Exception as err:
        log.exception("job %s", active.job_id)
        return Outcome("failed", "error", f"{type(err).__name__}: {err}")


def record(store: Store, job_id: str, outcome: Outcome, stopping: threading.Event) -> bool:
    """Move the job to the outcome's state, retrying while the store cannot
    be written; False if the service stopped first (or the move is illegal)."""
    wait, failures = FIRST_RETRY_S, 0
    while True:
        try:
            store.transition(job_id, outcome.state, outcome.reason, error=outcome.error)
            if failures:
                log.warning("job %s recorded as %s after %d failed tries", job_id, outcome.state, failures)
            return True
        except (IllegalTransition, NotFound) as err:
            log.warning("%s", err)
            return False
        except (StoreUnavailable, sqlite3.OperationalError) as err:
            failures += 1
            if failures == 1:
                log.error("job %s: cannot record it as %s (%s); trying again until the store takes it",
                          job_id, outcome.state, err)
        if stopping.wait(wait):
            return False
        wait = min(2 * wait, LAST_RETRY_S)
