"""Batch plan: grouped by key, seeded, identical global batches for any process count, resumable."""

from __future__ import annotations

import pytest
import torch

from focusdpo.train.batches import BatchPlanError, Position, ShardedBatches, epoch_batches, local_slice

KEYS = ["a"] * 7 + ["b"] * 5 + ["c"]


def test_batches_share_one_key_and_drop_incomplete_ones() -> None:
    plan = epoch_batches(KEYS, 2, seed=0, epoch=0)
    assert len(plan) == 3 + 2  # 7 // 2 + 5 // 2; the single "c" record fills no batch
    for batch in plan:
        assert len(batch) == 2 and len({KEYS[i] for i in batch}) == 1
    flat = [i for b in plan for i in b]
    assert len(set(flat)) == len(flat)


def test_plan_is_a_function_of_seed_and_epoch() -> None:
    assert epoch_batches(KEYS, 2, 0, 0) == epoch_batches(KEYS, 2, 0, 0)
    assert epoch_batches(KEYS, 2, 0, 0) != epoch_batches(KEYS, 2, 0, 1)
    assert epoch_batches(KEYS, 2, 0, 0) != epoch_batches(KEYS, 2, 1, 0)


def test_two_processes_split_the_global_batch_of_one() -> None:
    plan = epoch_batches(KEYS, 4, 0, 0)
    for batch in plan:
        assert local_slice(batch, 0, 2) + local_slice(batch, 1, 2) == batch
        assert local_slice(batch, 0, 1) == batch


def test_no_full_batch_names_the_fix() -> None:
    with pytest.raises(BatchPlanError, match="data.batch_size"):
        epoch_batches(["a", "b", "c"], 2, 0, 0)


class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(KEYS)

    def __getitem__(self, i: int) -> int:
        return i


def test_resume_from_a_position_continues_the_same_sequence() -> None:
    """Across an epoch boundary: batches after position p of a fresh iterator == an iterator started at p."""
    data = ShardedBatches(_Items(), list, KEYS, batch_size=2, rank=0, world=1, seed=3)
    it = data.iterate(Position(0, 0))
    straight = [next(it) for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    pos = straight[6][0]
    resumed = data.iterate(pos)
    assert [b for _, b in straight[7:]] == [next(resumed)[1] for _ in range(5)]
    assert straight[4][0] == Position(1, 0)


def test_worker_processes_yield_the_same_batches(tiny_env) -> None:
    """data.num_workers > 0 changes where items are decoded, not what a step sees."""
    from train_fixtures import tiny_config

    from focusdpo.data import ensure_toy_dip
    from focusdpo.data.dataset import DipDataset, collate_dip

    ds = DipDataset(ensure_toy_dip(tiny_config(*tiny_env)))

    def first(workers: int) -> list:
        it = ShardedBatches(ds, collate_dip, ds.keys, 2, 0, 1, seed=0, num_workers=workers).iterate(Position(0, 5))
        return [next(it)[1] for _ in range(4)]  # crosses into epoch 1 (8 batches per epoch)

    for a, b in zip(first(0), first(2), strict=True):
        assert a["id"] == b["id"] and torch.equal(a["positive"], b["positive"])
