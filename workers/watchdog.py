"""The watchdog: finds work that takes longer than resources.worker_timeout_s.

The job's loop says when it starts waiting for a piece of work (a sync step,
an async shard batch) and when the result came. A thread of the watchdog's
own looks every second; work overdue is counted as a hang by the failure
policy, the workers making it are killed, and the job then recovers exactly
as from workers that died. Which workers make a piece of work is known for an
async batch; for a sync step the step graph is asked (`find_hung`), and every
worker is killed when none of them hangs (the servers or the transfers do).

Waiting, finding and killing share one lock, so a result that arrives while
the watchdog kills is only taken once the kill is done, and the workers
never change under it.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from workers.recovery import FailurePolicy, Work
from workers.protocol import WorkersHung

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, limit: float, policy: FailurePolicy, kill: Callable[[list[int]], None], on_event: Callable):
        self.limit, self.policy, self.kill, self.on_event = limit, policy, kill, on_event
        self.find_hung: Callable[[list[Work]], list[int]] = lambda works: []
        self._lock = threading.Lock()
        self._since: dict[tuple, tuple[Work, float]] = {}  # work key -> (work, when the wait began)

    def started(self, work: Work) -> None:
        with self._lock:
            self._since[work.key] = (work, time.monotonic())

    def finished(self, work: Work) -> None:
        with self._lock:
            self._since.pop(work.key, None)

    @contextmanager
    def waiting(self, work: Work) -> Iterator[None]:
        self.started(work)
        try:
            yield
        finally:
            self.finished(work)

    @contextmanager
    def running(self, find_hung: Callable[[list[Work]], list[int]] | None = None) -> Iterator[None]:
        """Watch while the body runs (not at all when the limit is 0);
        `find_hung` names the workers that hang in work that does not say."""
        if find_hung is not None:
            self.find_hung = find_hung
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

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(min(1.0, self.limit / 4)):
            with self._lock:
                now = time.monotonic()
                overdue = [w for w, since in self._since.values() if now - since > self.limit]
                if not overdue:
                    continue
                for w in overdue:
                    del self._since[w.key]
                known = {i for w in overdue if w.workers is not None for i in w.workers}
                asked = [w for w in overdue if w.workers is None]
                workers = sorted(known | set(self.find_hung(asked) if asked else ()))
                # counted before the kill, so that the recovery sees a last hang
                self.policy.hung(overdue, workers)
                self.kill(workers)
            try:
                self.on_event(WorkersHung(min(w.step for w in overdue), self.limit, tuple(workers)))
            except Exception:  # a callback's error must not end the watch
                log.exception("reporting hung workers")
