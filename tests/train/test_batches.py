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
