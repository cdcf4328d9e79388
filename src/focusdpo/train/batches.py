"""Deterministic, resumable, process-sharded batch order for training.

Every process computes the same list of *global* batches for an epoch (records grouped by a key such as
``(K, H, W)`` so that one batch has one shape, shuffled with ``(seed, epoch)``), and takes its own contiguous
slice of each global batch. Hence

- the global batch of a step is the same for any number of processes (``batch_size * num_processes`` records),
  so a 2-process run sees exactly the pairs a 1-process run with twice the batch size sees;
- the data position is two integers (epoch, index of the next global batch), stored in checkpoints;
  resuming rebuilds the epoch's order from the seed and starts at that index, without reading skipped data.

Incomplete global batches at the end of each group are dropped (every step has the same batch size, which
equal-shard DDP needs); the number dropped per epoch is at most ``(#groups) * (global_batch - 1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class BatchPlanError(ValueError):
    """The data cannot fill one global batch; the message names the fix."""


def epoch_batches(keys: Sequence[Hashable], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: lists of ``global_batch`` record indices sharing one key.

    Records are shuffled within each key group, groups are cut into full batches, and the batches of all
    groups are shuffled together; all of it seeded by ``(seed, epoch)``. Same inputs, same output.
    """
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch} is invalid: allowed >= 1")
    rng = np.random.default_rng([seed, epoch])
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches: list[list[int]] = []
    for key in sorted(groups, key=repr):  # a fixed group order whatever the dict order
        idx = np.array(groups[key])[rng.permutation(len(groups[key]))]
        for start in range(0, len(idx) - global_batch + 1, global_batch):
            batches.append([int(i) for i in idx[start:start + global_batch]])
    if not batches:
        sizes = {repr(k): len(v) for k, v in groups.items()}
        raise BatchPlanError(f"no group of records with the same (subjects, size) fills one global batch of "
                             f"{global_batch} pairs (group sizes {sizes}): lower data.batch_size or use "
                             f"fewer processes or more records (data.n_records)")
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def local_slice(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (``len(batch)`` must divide by ``world``)."""
    if len(batch) % world:
        raise ValueError(f"a global batch of {len(batch)} does not split over {world} processes")
    per = len(batch) // world
    return list(batch[rank * per:(rank + 1) * per])


@dataclass
class Position:
    """The next global batch to train on: ``batch`` indexes into :func:`epoch_batches` of ``epoch``."""

    epoch: int
    batch: int


class ShardedBatches:
    """Iterates ``(position_after, batch)`` forever over epochs, from a start :class:`Position`.

    Args:
        dataset: map-style dataset of records; collate: list of items -> batch dict.
        keys: one grouping key per record; batch_size: pairs per process; rank/world: this process.
        seed: data-order seed; num_workers: loader worker processes; pin_memory: for a CUDA device.
    """

    def __init__(self, dataset: Dataset, collate: Callable[[list[Any]], Any], keys: Sequence[Hashable],
                 batch_size: int, rank: int, world: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        self.dataset, self.collate, self.keys = dataset, collate, list(keys)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        epoch_batches(self.keys, self.global_batch, seed, 0)  # fail now, before any work, if it cannot fill one

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def iterate(self, start: Position) -> Iterator[tuple[Position, Any]]:
        epoch, first = start.epoch, start.batch
        while True:
            plan = epoch_batches(self.keys, self.global_batch, self.seed, epoch)
            local = [local_slice(b, self.rank, self.world) for b in plan[first:]]
            loader = DataLoader(self.dataset, batch_sampler=local, collate_fn=self.collate,
                                num_workers=self.num_workers, pin_memory=self.pin_memory,
                                generator=torch.Generator().manual_seed(self.seed))
            for i, batch in enumerate(loader, start=first):
                after = Position(epoch, i + 1) if i + 1 < len(plan) else Position(epoch + 1, 0)
                yield after, batch
            epoch, first = epoch + 1, 0
