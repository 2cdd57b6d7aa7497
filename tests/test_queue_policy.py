"""The queue's rule (service.queue_policy.choose) as a table: which job
starts given the queue, the free and total CPUs and the overtake counts;
which never fits; what the head waits for."""

from __future__ import annotations

import pytest

from service.queue_policy import Waiting, choose, never_fits


def jobs(*cpus: int) -> list[Waiting]:
    """Jobs j0, j1, ... of one CPU per worker, needing these CPUs."""
    return [Waiting(f"j{i}", n, 1) for i, n in enumerate(cpus)]


CASES = [
    # queue CPUs, free, total, overtakes, max_overtakes -> started, overtaken, failed
    ((2, 1), 2, 6, {}, 3, "j0", [], []),               # the head fits: it starts
    ((3, 1), 2, 6, {}, 3, "j1", ["j0"], []),           # it does not: the next that fits backfills
    ((3, 3, 1), 2, 6, {}, 3, "j2", ["j0", "j1"], []),  # passing every older waiting job
    ((3, 1), 2, 6, {"j0": 3}, 3, None, [], []),        # overtaken 3 times: nothing passes it again
    ((3, 1), 2, 6, {"j0": 2}, 3, "j1", ["j0"], []),    # twice: once more
    ((3, 1), 2, 6, {}, 0, None, [], []),               # max_overtakes 0: strict FIFO
    ((3, 3, 1), 2, 6, {"j1": 3}, 3, None, [], []),     # a blocked second job stops what is behind it too
    ((3, 2, 3), 2, 6, {"j0": 3}, 3, None, [], []),     # ... and so does a blocked head
    ((7, 1), 6, 6, {}, 3, "j1", [], ["j0"]),           # more than the cluster has in all: failed, not waited for
    ((7, 7), 6, 6, {}, 0, None, [], ["j0", "j1"]),     # every never-fitting job, whatever the rule
    ((3,), 0, 0, {}, 3, None, [], []),                 # no CPUs at all (nodes not joined yet): wait
]


@pytest.mark.parametrize("cpus, free, total, overtakes, limit, started, overtaken, failed", CASES)
def test_choose(cpus, free, total, overtakes, limit, started, overtaken, failed):
    choice = choose(jobs(*cpus), free, total, overtakes, limit)
    assert (choice.start.job_id if choice.start else None) == started
    assert choice.overtaken == overtaken
    assert [job.job_id for job, _ in choice.never_fit] == failed


def test_the_reasons_name_the_figures():
    big = Waiting("big", 4, 2)
    assert never_fits(big, 6) == ("needs 8 CPUs (resources.workers 4 × cpus_per_worker 2); "
                                  "the cluster has 6 in all")
    assert never_fits(big, 8) is None
    assert choose([big, *jobs(1)], 2, 8, {}, 3).waiting_for == "job big needs 8 CPU(s); the cluster has 2 free"
    assert choose([big, *jobs(1)], 2, 8, {"big": 1}, 1).waiting_for == (
        "job big needs 8 CPU(s); the cluster has 2 free; job big was overtaken 1 time(s) (max_overtakes), "
        "so nothing behind it starts before it")
    assert choose(jobs(1), 2, 8, {}, 3).waiting_for is None
