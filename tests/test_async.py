"""Async mode on a real Ray cluster: bounded staleness, and it learns as well
as sync within 1.5x the training samples. Not bit-reproducible by design."""

from __future__ import annotations

import pytest

from core.spec import parse_spec
from workers.coordinator import Coordinator
from spec_helpers import place

pytestmark = [pytest.mark.ray]


def digits(mode, steps, **training):
    return parse_spec(place({
        "name": f"digits-{mode}", "seed": 0,
        "data": {"source": "digits", "shards": 4},
        "model": {"hidden": [64]},
        "training": {"mode": mode, "batch_size": 128, "steps": steps, "eval_every": 0,
                     "checkpoint_every": 0, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        "resources": {"workers": 2},
    }, **training))


def test_async_reaches_sync_accuracy_within_one_and_a_half_times_the_samples(ray_cluster, tmp_path):
    sync_records = []
    Coordinator(digits("sync", 30), tmp_path / "sync", on_step=sync_records.append).run()
    sync_samples = sum(r["samples"] for r in sync_records)
    target = sync_records[-1]["val_accuracy"]
    # Each async update is one shard's batch (128 / 4 rows): 1.5x the samples is 180 updates.
    # (30 sync steps reach 0.939 here; async, 0.975 at best, passes 0.939 after 70 updates.)
    # One worker keeps the order of updates, hence this assertion, deterministic; the race
    # between several workers is exercised by the staleness test below.
    async_records = []
    coordinator = Coordinator(digits("async", 180, eval_every=10, max_staleness=4, workers=1), tmp_path / "async",
                              on_step=async_records.append)
    coordinator.run()
    assert sum(r["samples"] for r in async_records) == pytest.approx(1.5 * sync_samples)
    best = max(r["val_accuracy"] for r in async_records if r["val_accuracy"] is not None)
    print(f"sync {target:.4f} after {sync_samples} samples; async best {best:.4f}")
    assert best >= target, (best, target)
    assert all(0 <= r["staleness"] <= 4 for r in async_records)


def test_stale_gradients_are_refused(ray_cluster, tmp_path):
    records = []
    coordinator = Coordinator(digits("async", 40, max_staleness=0), tmp_path / "run", on_step=records.append)
    coordinator.run()
    assert len(records) == 40 and all(r["staleness"] == 0 for r in records)
    # two workers race: every time both compute on the same version, the later one is refused
    assert coordinator.counters.stale_rejected > 0
