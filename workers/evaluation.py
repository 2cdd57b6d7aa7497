"""Data-parallel evaluation: the workers evaluate the validation blocks.

The validation rows are cut into fixed evaluation blocks (core.rows); for a
step that evaluates, the driver sends the parameters once and block k to
the (k mod W)-th live worker, which reads it itself (for a prepared set,
its files checked first), and adds the blocks' loss sums and correct counts
in block order (core.trainer.combine_evaluation). So the driver never holds
the validation set, and the figures have the reference's bits whichever
worker evaluated which block. A block whose worker died goes to the others
(the dead one is replaced by the step that finds it).
"""

from __future__ import annotations

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from core.rows import RowSource
from core.trainer import TrainingError, combine_evaluation
from workers.pool import WorkerPool
from workers.recovery import job_error


class Evaluation:
    def __init__(self, pool: WorkerPool, rows: RowSource):
        self.pool = pool
        self.blocks, self.rows, self.classification = rows.n_val_blocks, rows.n_val, rows.n_classes is not None

    def __call__(self, params: np.ndarray) -> tuple[float | None, float | None]:
        """Mean validation loss and accuracy at `params`."""
        if self.rows == 0:
            return None, None
        ref = ray.put(params)
        results: dict[int, tuple[float, int]] = {}
        gone: set[int] = set()
        while len(results) < self.blocks:
            members = [m for m in self.pool.members if m.index not in gone]
            if not members:
                raise TrainingError("no live worker left to evaluate the validation set on")
            missing = [k for k in range(self.blocks) if k not in results]
            calls = [(m.index, m.actor.evaluate.remote(ref, tuple(missing[w::len(members)])))
                     for w, m in enumerate(members) if missing[w::len(members)]]
            for index, call in calls:
                try:
                    results.update((k, (loss, correct)) for k, loss, correct in ray.get(call))
                except RayActorError:
                    gone.add(index)
                except RayTaskError as err:
                    raise job_error(err.cause if err.cause is not None else err, f"worker {index}: ") from None
        return combine_evaluation([results[k] for k in range(self.blocks)], self.rows, self.classification)
