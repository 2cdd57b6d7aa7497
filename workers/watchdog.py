"""The watchdog: finds work that takes longer than resources.worker_timeout_s.

The job's loop says when it starts waiting for a piece of work (a sync step,
an async shard batch) and when the result came. A thread of the watchdog's
own looks every second (a quarter of the limit when that is shorter); work
overdue whose result is not ready is counted as a hang by the failure
policy, the workers making it are killed, and the job then recovers exactly
as from workers that died. Which workers make a piece of work is known for
an async batch; for a sync step the step graph is asked (`find_hung`), and
every worker is killed when none of them hangs (the servers or the
transfers do).

Waiting, finding and killing share one lock, so a sync result that arrives
while the watchdog kills is only taken once the kill is done. Workers are
killed by index, and indices are never reused, so a worker the loop drops
meanwhile is at worst killed twice.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import ray

from workers.recovery import FailurePolicy, Work
from workers.protocol import WorkersHung

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, limit: float, policy: FailurePolicy, kill: Callable[[list[int]], None], on_event: Callable):
        self.limit, self.policy, self.kill, self.on_event = limit, policy, kill, on_event
        # For work that does not name its workers (a sync step): who hangs in it.
        self.find_hung: Callable[[list[Work]], list[int]] = lambda works: []
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._since: dict[int, tuple[Work, float, object]] = {}  # token -> (work, wait began, its result ref)

    def started(self, work: Work, ref=None) -> int:
        """Time `work` from now; `ref`, its result's object ref if it has one
        (a result that is ready is waiting for the loop, not hung). Returns
        the token to say it finished with."""
        with self._lock:
            token = next(self._tokens)
            self._since[token] = (work, time.monotonic(), ref)
            return token

    def finished(self, token: int) -> None:
        with self._lock:
            self._since.pop(token, None)

    @contextmanager
    def waiting(self, work: Work) -> Iterator[None]:
        token = self.started(work)
        try:
            yield
        finally:
            self.finished(token)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Watch while the body runs (not at all when the limit is 0)."""
        if self.limit <= 0:
            yield
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._watch, args=(stop,), name="shardprop-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)

    def _overdue(self) -> list[tuple[int, Work]]:
        now = time.monotonic()
        late = [(t, w, ref) for t, (w, since, ref) in self._since.items() if now - since > self.limit]
        refs = [ref for _, _, ref in late if ref is not None]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        return [(t, w) for t, w, ref in late if ref is None or ref not in ready]

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(min(1.0, self.limit / 4)):
            with self._lock:
                overdue = self._overdue()
                if not overdue:
                    continue
                for token, _ in overdue:
                    del self._since[token]
                works = [w for _, w in overdue]
                known = {i for w in works if w.workers is not None for i in w.workers}
                asked = [w for w in works if w.workers is None]
                workers = sorted(known | set(self.find_hung(asked) if asked else ()))
                # counted before the kill, so that the recovery sees a last hang
                self.policy.hung(works, workers)
                self.kill(workers)
            try:
                self.on_event(WorkersHung(min(w.step for w in works), self.limit, tuple(workers)))
            except Exception:  # a callback's error must not end the watch
                log.exception("reporting hung workers")
