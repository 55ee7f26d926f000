"""The pool reaches the extraction actors as a Ray Dataset of (shard, sample id, image) rows,
one block per shard: each actor gets whole shards, never the whole pool (real local Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amalgam.data.pool import Pool
from amalgam.distributed.extract import PoolRows, ensure_ray, pool_dataset


def _pool(n: int) -> Pool:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    return Pool(ids=[f"s/{i}" for i in range(n)], images=images, labels=torch.full((n,), -1), class_names=[])


def test_pool_rows_read_a_shard_by_pool_positions_and_refuse_others():
    r = PoolRows(10, list("abcde"))
    assert r[10:15] == list("abcde") and r[12:14] == ["c", "d"]
    with pytest.raises(IndexError):
        r[9:12]
    with pytest.raises(IndexError):
        r[14:16]


def test_pool_dataset_has_one_block_per_shard_with_exactly_its_rows():
    ensure_ray(num_cpus=2)
    pool = _pool(23)
    shard_size = 8

    def rows_of(i: int) -> range:
        return range(i * shard_size, min(len(pool), (i + 1) * shard_size))

    todo = [0, 2]  # shard 1 already stored: it is not shipped at all
    ds = pool_dataset(pool, todo, rows_of)
    assert ds.num_blocks() == 2 and ds.count() == 8 + 7
    seen = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        (shard,) = set(batch["shard"].tolist())  # a block never mixes shards
        seen[shard] = batch
    assert sorted(seen) == todo
    for i, batch in seen.items():
        rows = rows_of(i)
        assert batch["sample_id"].tolist() == pool.ids[rows.start:rows.stop]
        assert np.array_equal(batch["image"], pool.images[rows.start:rows.stop].numpy())
