"""Loading DIP shards for training: a streaming Dataset, a bucketing batch sampler, the collate.

:class:`DipDataset` keeps only a small index in memory (shard, row group, row, K, sizes: read from the
metadata columns alone) and reads rows on demand, one Parquet row group at a time, into an LRU cache of row
groups per process bounded in bytes (``cache_bytes``); PNGs are decoded per item. Every DataLoader worker
opens its own file handles.

:class:`BucketBatchSampler` makes every batch hold one ``K`` and one set of sizes (target ``H, W`` and each
reference's ``h_k, w_k``), so the collate can stack. For an epoch ``e`` and seed ``s`` it shuffles the records
inside each bucket, cuts them into batches, shuffles the batch order (all with ``numpy`` seeded by
``(s, e)``), then gives rank ``r`` of ``world_size`` the batches ``r, r + world_size, ...``, truncated to the
same count on every rank (so DDP never waits on a rank with fewer batches). The order is a pure function of
``(seed, epoch, rank, world_size)``.

:class:`DipDataLoader` (what :func:`make_dataloader` returns) is a ``torch.utils.data.DataLoader`` that counts
the batches handed to the caller, so its ``state_dict() -> {"epoch", "batches"}`` is exact even with
prefetching workers; ``load_state_dict`` makes the next pass start at that epoch, skipping that many batches.
A full pass advances the epoch by one. Do not pass it to ``accelerator.prepare`` (it shards by rank itself).

Batch layout (:func:`collate_dip`), one ``K`` per batch::

    "id": list[str], "prompt": list[str], "disruption": list[str]
    "positive", "negative": float32 [B, 3, H, W] in [0, 1]
    "m_prior":    float32 [B, H, W] in {0, 1}     where the negative may differ from the positive
    "regions":    float32 [B, K, H, W] in {0, 1}  P_k in the positive, reference order
    "references": list of K float32 [B, 3, h_k, w_k] in [0, 1]
    "ref_masks":  list of K float32 [B, h_k, w_k] in {0, 1}   all ones when unknown
    "m_d":        float32 [B, H / m_d_patch, W / m_d_patch] in [0, 1]   DPCE of the positive (not masked)
    "m_d_patch":  int                             pixels per token side of m_d
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from focusdpo.data.parquet import INDEX_COLUMNS, decode_row, open_shard, read_row_group, shard_paths


class DipDataset(Dataset):
    """Map-style Dataset over the Parquet shards of a built DIP set; rows are read on demand.

    Args:
        path: a built set's folder (``data-*.parquet``) or one shard file.
        cache_bytes: budget of the per-process LRU cache of row groups (Arrow tables holding the PNG bytes, not
            decoded images). The 2000-record toy set (8 MB) fits in the default and is read from disk once;
            larger sets stream, keeping at most this much (and at least one row group) in memory.
    """

    def __init__(self, path: str | Path, cache_bytes: int = 256 * 2**20) -> None:
        self.shards = shard_paths(path)
        self.cache_bytes = int(cache_bytes)
        self._cached_bytes = 0
        loc, keys, ids = [], [], []
        for s, shard in enumerate(self.shards):
            pf = open_shard(shard)
            meta = read_row_group(pf, None, shard, INDEX_COLUMNS).to_pydict()
            row = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                loc.extend((s, g, r) for r in range(n))
                row += n
            for i in range(row):
                keys.append((meta["num_subjects"][i], meta["height"][i], meta["width"][i],
                             tuple(zip(meta["ref_heights"][i], meta["ref_widths"][i], strict=True))))
            ids.extend(meta["id"])
        self._loc = np.asarray(loc, dtype=np.int64).reshape(-1, 3)
        self.keys: list[tuple[Any, ...]] = keys
        self.ids: list[str] = ids
        self._files: dict[int, pq.ParquetFile] = {}
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"], state["_cache"], state["_cached_bytes"] = {}, OrderedDict(), 0
        return state

    def _row_group(self, shard: int, group: int) -> pa.Table:
        if self._pid != os.getpid():  # forked worker: never share file handles with the parent
            self._files, self._cache, self._cached_bytes, self._pid = {}, OrderedDict(), 0, os.getpid()
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self.shards[shard])
        rows = read_row_group(self._files[shard], group, self.shards[shard])
        self._cache[key] = rows
        self._cached_bytes += rows.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return rows

    def record(self, index: int):
        """The :class:`~focusdpo.data.records.DipRecord` at ``index`` (numpy arrays)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} is out of range for a set of {len(self)} records")
        shard, group, row = (int(v) for v in self._loc[index])
        return decode_row(self._row_group(shard, group).slice(row, 1).to_pylist()[0], self.shards[shard],
                          f"row {row} of row group {group}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One record as tensors (the per-item version of the batch layout in the module docstring)."""
        return record_item(self.record(index))


def record_item(rec) -> dict[str, Any]:
    """A :class:`~focusdpo.data.records.DipRecord` as one item of the batch layout (what ``collate_dip`` stacks)."""

    def img(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)

    return {
        "id": rec.id, "prompt": rec.prompt, "disruption": rec.disruption,
        "positive": img(rec.positive), "negative": img(rec.negative),
        "m_prior": torch.from_numpy(rec.m_prior).float(), "regions": torch.from_numpy(rec.regions).float(),
        "references": [img(r) for r in rec.references],
        "ref_masks": [torch.from_numpy(m).float() for m in rec.ref_masks],
        "m_d": torch.from_numpy(rec.m_d), "m_d_patch": rec.m_d_patch,
    }


def uncollate_dip(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Inverse of :func:`collate_dip`: the batch's items (views of its tensors)."""
    out = []
    for i in range(len(batch["id"])):
        out.append({
            "id": batch["id"][i], "prompt": batch["prompt"][i], "disruption": batch["disruption"][i],
            "positive": batch["positive"][i], "negative": batch["negative"][i], "m_prior": batch["m_prior"][i],
            "regions": batch["regions"][i], "references": [r[i] for r in batch["references"]],
            "ref_masks": [m[i] for m in batch["ref_masks"]], "m_d": batch["m_d"][i], "m_d_patch": batch["m_d_patch"],
        })
    return out


def collate_dip(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of one bucket into the batch layout of the module docstring.

    Raises ValueError naming the records when K, sizes or ``m_d_patch`` differ (use :class:`BucketBatchSampler`).
    """
    if not items:
        raise ValueError("collate_dip got an empty batch")
    first = items[0]
    k = len(first["references"])
    for it in items[1:]:
        same = (len(it["references"]) == k and it["positive"].shape == first["positive"].shape
                and it["m_d_patch"] == first["m_d_patch"]
                and all(a.shape == b.shape for a, b in zip(it["references"], first["references"], strict=True)))
        if not same:
            raise ValueError(f"records {first['id']!r} and {it['id']!r} differ in K, image/reference sizes or "
                             "m_d_patch; batch them with BucketBatchSampler (one bucket per batch)")
    return {
        "id": [it["id"] for it in items], "prompt": [it["prompt"] for it in items],
        "disruption": [it["disruption"] for it in items],
        "positive": torch.stack([it["positive"] for it in items]),
        "negative": torch.stack([it["negative"] for it in items]),
        "m_prior": torch.stack([it["m_prior"] for it in items]),
        "regions": torch.stack([it["regions"] for it in items]),
        "references": [torch.stack([it["references"][j] for it in items]) for j in range(k)],
        "ref_masks": [torch.stack([it["ref_masks"][j] for it in items]) for j in range(k)],
        "m_d": torch.stack([it["m_d"] for it in items]),
        "m_d_patch": int(first["m_d_patch"]),
    }


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose ``keys`` are equal (one K and one set of sizes per batch); see module docstring.

    Args:
        keys: one hashable bucket key per record (``DipDataset.keys``).
        batch_size: records per batch (the last batch of a bucket may be smaller unless ``drop_last``).
        shuffle: shuffle inside buckets and the batch order (False: buckets in key order, records in order).
        seed: base seed of the order.
        rank, world_size: this process's share of the batches.
        drop_last: drop each bucket's incomplete last batch.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.keys, self.batch_size, self.shuffle, self.seed = list(keys), batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0
        if len(self._rank_batches()) == 0:
            raise ValueError(f"{len(self.keys)} records give no batch of {batch_size} for rank {rank} of "
                             f"{world_size} (drop_last={drop_last}); lower batch_size or build more records")

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next pass on."""
        self.epoch = int(epoch)

    def skip(self, n: int) -> None:
        """Start the next pass at batch ``n`` of this rank's order (resume); later passes start at 0."""
        if not 0 <= n <= len(self._rank_batches()):
            raise ValueError(f"cannot skip {n} batches: an epoch has {len(self._rank_batches())} on this rank")
        self.start = int(n)

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        buckets: dict[Hashable, list[int]] = {}
        for i, key in enumerate(self.keys):
            buckets.setdefault(key, []).append(i)
        batches = []
        for key in sorted(buckets, key=repr):
            idx = np.asarray(buckets[key])
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size].tolist()
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        batches = self._all_batches()
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank::self.world_size][:per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        batches, start = self._rank_batches(), self.start
        self.start = 0
        yield from batches[start:]

    def __len__(self) -> int:
        return len(self._rank_batches()) - self.start


class DipDataLoader(DataLoader):
    """A DataLoader over :class:`DipDataset` + :class:`BucketBatchSampler` with an exact data position."""

    def __init__(self, dataset: DipDataset, batch_sampler: BucketBatchSampler, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_dip, num_workers=num_workers)
        self.epoch, self.batches = 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        sampler: BucketBatchSampler = self.batch_sampler  # type: ignore[assignment]
        sampler.set_epoch(self.epoch)
        sampler.skip(self.batches)
        for batch in super().__iter__():
            self.batches += 1
            yield batch
        self.epoch, self.batches = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the batches of that epoch already handed out."""
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next pass is epoch ``state["epoch"]`` starting after ``state["batches"]`` batches."""
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


def make_dataloader(path: str | Path, cfg, shuffle: bool = True, seed: int | None = None, rank: int = 0,
                    world_size: int = 1, batch_size: int | None = None, drop_last: bool = False) -> DipDataLoader:
    """The training loader of a built DIP set.

    Args:
        path: the set's folder.
        cfg: :class:`~focusdpo.config.Config` (``data.batch_size``, ``data.num_workers``, ``train.seed``).
        shuffle, drop_last: see :class:`BucketBatchSampler`.
        seed: order seed (None: ``cfg.train.seed``).
        rank, world_size: this process's share.
        batch_size: records per batch per process (None: ``cfg.data.batch_size``).
    """
    ds = DipDataset(path)
    sampler = BucketBatchSampler(ds.keys, batch_size or cfg.data.batch_size, shuffle=shuffle,
                                 seed=cfg.train.seed if seed is None else seed, rank=rank,
                                 world_size=world_size, drop_last=drop_last)
    return DipDataLoader(ds, sampler, num_workers=cfg.data.num_workers)
