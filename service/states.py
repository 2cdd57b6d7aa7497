"""A job's states and the moves between them, defined once for the store,
the scheduler, the metrics, the API and the command line.

A job is queued, then running, then succeeded, failed or cancelled; the last
three are final.
"""

from __future__ import annotations

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# from -> the states it may move to
LEGAL = {
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "cancelled"},
    "succeeded": set(),
    "failed": set(),
    "cancelled": set(),
}
