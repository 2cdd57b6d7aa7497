"""One running job: its data prepared when it needs to be, its Coordinator
driven to the end in a thread of the scheduler, how the end maps to a final
state, and recording that state in the store, retried until the store takes it.

A large raw source is prepared into the cache (core/data_source.py) before
the coordinator starts; meanwhile the job is `running` with `phase`
"preparing data: ..." (its progress), and its timeline holds
`preparing_data` and `data_prepared` events. Then it is admitted again on
what the prepared data holds, and its provenance's data hash becomes the
prepared set's manifest hash.

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
    phase: str | None = None  # what the job does before its first step ("preparing data: ...")


class Outcome(NamedTuple):
    state: str
    reason: str
    error: str | None = None


def prepare_data(active: Active, settings, store: Store, stopping: threading.Event) -> Outcome | None:
    """Prepare the job's data if it is a large raw source not cached yet; a
    failed Outcome when that fails or the prepared data refuses the job.
    A cancel or a stopping service interrupts it (JobCancelled) at its next
    progress report; nothing half-written is left in the cache."""
    import time

    from core.data_source import NotPrepared, resolve
    from service.admission import admit
    from workers.coordinator import JobCancelled

    spec = active.coordinator.spec
    roots, limits = [str(r) for r in settings.data_roots], settings.data_limits()

    def on_status(text: str) -> None:
        if active.cancel_requested or stopping.is_set():
            raise JobCancelled()
        active.phase = text

    try:
        try:
            resolve(spec.data, dtype=spec.training.dtype, data_roots=roots, limits=limits, prepare=False)
            return None  # in memory, a prepared set, or prepared already
        except NotPrepared:
            pass
        store.record_event(active.job_id, "preparing_data", None, {"source": spec.data.source})
        started = time.monotonic()
        prepared = resolve(spec.data, dtype=spec.training.dtype, data_roots=roots, limits=limits,
                           on_status=on_status)
        store.record_event(active.job_id, "data_prepared", None, {
            "manifest_sha256": prepared.manifest_sha256, "rows": prepared.n_train + prepared.n_val,
            "seconds": round(time.monotonic() - started, 3)})
        store.set_data_sha256(active.job_id, prepared.manifest_sha256)
        admit(spec, settings)  # Refused (a ValueError) names what the prepared data holds
    except ValueError as err:  # a DataError, Refused
        return Outcome("failed", "error", str(err))
    except OSError as err:  # a full disk under the cache
        return Outcome("failed", "error", f"data.source {spec.data.source!r}: cannot prepare it: "
                                          f"{err.strerror or err}")
    finally:
        active.phase = None
    return None


def run_to_end(active: Active, resume: bool, model_path: Path, stopping: threading.Event,
               before=lambda: None, prepare: Callable[[], bool] | None = None) -> Outcome | None:
    """Run `before` (preparing the data: an Outcome when it ends the job),
    then the job's coordinator; the state it ends in, or None when the
    service is stopping (the job stays `running` and resumes at the next start).
    `prepare()` readies the job's checkpoints first (a sweep's promotion
    gets its rung before's); True: resume from them."""
    from core.trainer import TrainingError
    from workers.coordinator import JobCancelled

    try:
        ended = before()
        if ended is not None:
            return ended
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
