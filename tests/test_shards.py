"""Logical shards: ownership, batch sizes and the walk through epochs."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from core.shards import make_shards, shard_batch_size, shard_rows


@given(n=st.integers(1, 500), data=st.data())
@settings(max_examples=60, deadline=None)
def test_shards_partition_the_training_rows(n, data):
    S = data.draw(st.integers(1, n))
    parts = shard_rows(n, S, seed=3)
    assert len(parts) == S
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@given(batch=st.integers(1, 10_000), S=st.integers(1, 64))
def test_batch_sizes_spread_the_remainder(batch, S):
    sizes = [shard_batch_size(batch, S, s) for s in range(S)]
    assert sum(sizes) == batch and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_epoch_visits_every_row_once_across_shards():
    # 4 shards of 25 rows, 5 rows per shard per step: 5 steps are one epoch.
    shards = make_shards(100, 4, 20, seed=1)
    seen = np.concatenate([sh.batch(t) for t in range(5) for sh in shards])
    assert sorted(seen.tolist()) == list(range(100))


def test_steps_continue_into_the_next_epoch_in_a_new_order():
    (shard,) = make_shards(10, 1, 4, seed=0)
    walk = np.concatenate([shard.batch(t) for t in range(5)])  # 20 rows: two epochs
    first, second = walk[:10], walk[10:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not np.array_equal(first, second)
    # step 2 straddles the epoch boundary: 2 rows from epoch 0, 2 from epoch 1
    assert np.array_equal(shard.batch(2), np.concatenate([shard.order(0)[8:], shard.order(1)[:2]]))


def test_a_batch_larger_than_the_shard_wraps_several_epochs():
    (shard,) = make_shards(3, 1, 7, seed=5)
    b = shard.batch(0)
    assert len(b) == 7
    assert np.array_equal(b, np.concatenate([shard.order(0), shard.order(1), shard.order(2)[:1]]))


def test_batches_depend_only_on_seed_shard_and_step():
    a = make_shards(1000, 7, 128, seed=11)
    b = make_shards(1000, 7, 128, seed=11)
    for t in (0, 1, 50, 3):  # out of order: the position is a function of the step alone
        for x, y in zip(a, b):
            assert np.array_equal(x.batch(t), y.batch(t))
    c = make_shards(1000, 7, 128, seed=12)
    assert not np.array_equal(a[0].batch(0), c[0].batch(0))


def test_more_shards_than_rows_is_refused():
    with pytest.raises(ValueError, match="shards must be in"):
        shard_rows(3, 4, seed=0)
