"""The service's signals: SIGTERM and SIGINT stop it in order, SIGUSR1 prints
every thread's stack.

Connecting to Ray installs Ray's own C-level handler for SIGTERM, which
writes a crash report ("*** SIGTERM received ...", addresses of a stack)
before passing the signal on. A stop is not a crash, so the service takes
its stop signals back once Ray is connected (`create_app`'s lifespan sets
`reclaim_stop_signals` as the scheduler's `ray.on_connected`).
"""

from __future__ import annotations

import faulthandler
import signal
import threading


def reclaim_stop_signals() -> None:
    """Hand SIGTERM and SIGINT back to the handlers Python holds for them.

    The service's handlers (uvicorn's) alone shut it down in order: running
    jobs are stopped at a step boundary, their actors killed, and they stay
    `running` in the store, to resume from their latest checkpoint at the
    next start. Only the main thread may set handlers; a service run in
    another thread (the tests') keeps what it has."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if callable(handler):
            signal.signal(sig, handler)


def stacks_on_sigusr1() -> None:
    """SIGUSR1 prints the stack of every thread to stderr, for a service
    that stops answering. faulthandler writes from the signal handler itself,
    so it works even while some thread holds the GIL."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
