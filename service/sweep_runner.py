"""The sweep runner: turns each active sweep's decisions into trial jobs.

The scheduler's loop calls `advance` before every scheduling decision (it is
woken whenever a job ends). For each sweep not ended, the runner reads its
runs from the store, asks core.sweep's pure `decide` what to launch (never
more than `max_concurrent_trials` trial jobs queued or running; a rung's
promotions only once the whole rung has ended), stores each launch as an
ordinary queued job linked to its (sweep, trial, rung), and moves the sweep
to the state `sweep_state` gives. Trial jobs then wait in the one FIFO queue
with everyone's jobs, so a job submitted after a sweep is not starved by it:
it is ahead of every trial job launched after it.

Nothing is kept here that the store does not hold: a service killed
mid-sweep asks `decide` again at its next start with the same runs, gets
the same launches, and `create_run` gives back a run already made instead
of a second one. A promotion is a continuation job: before it runs,
`seed_continuation` copies the checkpoint its trial's rung before ended with
into its own checkpoint folder, and it resumes from there.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from core.spec import SpecError
from core.sweep import SweepSpec, decide, leaderboard, sweep_state
from service.metrics import SweepMetrics
from service.provenance import job_provenance
from service.settings import Settings
from service.states import LEGAL, TERMINAL
from service.store import IllegalTransition, NotFound, Store, StoreUnavailable
from service.sweeps import rung_results, stored_sweep, trial_states

log = logging.getLogger("shardprop.sweeps")
CANCEL_WAIT_S = 2.0  # per running trial job, as for a job's cancel


class SweepRunner:
    def __init__(self, settings: Settings, store: Store, cancel_job: Callable[..., dict], metrics: SweepMetrics):
        self.settings, self.store, self.metrics = settings, store, metrics
        self._cancel_job = cancel_job  # Scheduler.cancel
        self._lock = threading.Lock()  # one sweep decision or cancel at a time
        self._error: str | None = None  # the last failure logged
        self._sweep_errors: dict[str, str] = {}  # sweep -> the last failure logged for it

    def advance(self) -> int:
        """Launch what every active sweep's decision says; the number of jobs
        created. Never raises: a sweep that cannot advance now is tried again
        at the next call."""
        created = 0
        try:
            for job_id in self.store.unfinished_jobs_of_ended_sweeps():
                self._cancel(job_id, 0.0)
            for sweep_id in self.store.active_sweeps():
                created += self._advance_one(sweep_id)
            self._error = None
        except StoreUnavailable as err:  # a full disk: said once, tried again at the next call
            if str(err) != self._error:
                log.error("sweeps: %s; trying again", err)
            self._error = str(err)
        except Exception:
            log.exception("sweeps")
        return created

    def _advance_one(self, sweep_id: str) -> int:
        """One sweep's step; a sweep whose stored document no longer parses
        (a newer version's rules) fails, without holding up the others."""
        try:
            with self._lock:
                created = self._advance(sweep_id)
            self._sweep_errors.pop(sweep_id, None)
            return created
        except SpecError as err:
            self.store.sweep_transition(sweep_id, "failed", error=f"sweep document no longer valid: {err}")
            self.metrics.ended(sweep_id)
        except StoreUnavailable:
            raise
        except Exception as err:  # said once per sweep and message, tried again at the next call
            if self._sweep_errors.get(sweep_id) != repr(err):
                log.exception("sweep %s", sweep_id)
            self._sweep_errors[sweep_id] = repr(err)
        return 0

    def _sweep(self, sweep_id: str) -> SweepSpec:
        return stored_sweep(self.store.get_sweep(sweep_id, details=True)["document"])

    def _advance(self, sweep_id: str) -> int:
        sweep = self._sweep(sweep_id)
        results = rung_results(sweep, self.store.sweep_runs(sweep_id, sweep.objective.metric))
        created = 0
        for launch in decide(sweep, results).launch:
            spec = sweep.trial_spec(launch.trial, launch.rung)
            try:
                _, made = self.store.create_run(sweep_id, launch.trial, launch.rung, spec.model_dump(mode="json"),
                                                provenance=job_provenance(spec, self.settings))
            except IllegalTransition:  # cancelled meanwhile
                return created
            created += made
        if created:
            results = rung_results(sweep, self.store.sweep_runs(sweep_id, sweep.objective.metric))
        self._move(sweep_id, sweep_state(sweep, results), results)
        board = leaderboard(sweep, results)
        states = [row.state for row in board] + ["queued"] * (sweep.n_trials - len(board))  # not launched yet
        self.metrics.observe(sweep_id, trial_states(states), board[0].objective if board else None)
        return created

    def _move(self, sweep_id: str, to: str, results) -> None:
        """Bring the stored state to `to` (through running, from queued)."""
        before = self.store.get_sweep(sweep_id)["state"]
        if to == before:
            return
        for step in ([to] if to in LEGAL[before] else ["running", to] if before == "queued" else []):
            error = _failure(results) if step == "failed" else None
            self.store.sweep_transition(sweep_id, step, error=error)
        if to in TERMINAL:
            self.metrics.ended(sweep_id)
            log.info("sweep %s %s", sweep_id, to)

    def cancel(self, sweep_id: str) -> dict:
        """Cancel the sweep, then its queued and running trial jobs (a
        running one is given a few seconds to stop). NotFound, or
        IllegalTransition for a sweep that has ended otherwise."""
        with self._lock:
            sweep = self.store.get_sweep(sweep_id)
            if sweep["state"] != "cancelled":
                sweep = self.store.sweep_transition(sweep_id, "cancelled")
                self.metrics.ended(sweep_id)
        for run in self.store.sweep_runs(sweep_id):
            if run["state"] not in TERMINAL:
                self._cancel(run["job_id"], CANCEL_WAIT_S)
        return sweep

    def _cancel(self, job_id: str, wait_s: float) -> None:
        try:
            self._cancel_job(job_id, wait_s=wait_s)
        except (IllegalTransition, NotFound):  # it ended meanwhile
            pass

    def seed_continuation(self, job_id: str) -> bool:
        """For a promotion: its trial's checkpoint from the rung before,
        copied into its own folder; True when it must resume from it."""
        from workers.checkpoint import copy_checkpoint, list_checkpoints

        parent = self.store.run_parent(job_id)
        if parent is None:
            return False
        parent_job, rung = parent
        own = self.settings.checkpoint_dir(job_id)
        if not list_checkpoints(own):  # else: resumed after a restart, from its own latest
            step = self._sweep(self.store.get_job(job_id)["sweep"]).rungs[rung]
            copy_checkpoint(self.settings.checkpoint_dir(parent_job), own, step=step)
        return True


def _failure(results) -> str:
    failed = [r for r in results if r.state == "failed"]
    return (f"no trial ended with an objective value ({len(failed)} of {len(results)} trial job(s) failed)"
            if failed else "no trial ended with an objective value")
