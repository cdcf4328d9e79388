"""Loading DIP shards for training: a streaming Dataset and the collate (batch order: ``focusdpo.train.batches``).

:class:`DipDataset` keeps only a small index in memory (shard, row group, row, K, sizes: read from the
metadata columns alone) and reads rows on demand, one Parquet row group at a time, into an LRU cache of row
groups per process bounded in bytes (``cache_bytes``); PNGs are decoded per item. Every DataLoader worker
opens its own file handles.

The trainer groups records by ``K`` and sizes (target ``H, W`` and each reference's ``h_k, w_k``) so that the
collate can stack, and orders and shards the batches itself (:mod:`focusdpo.train.batches`: the same global batch
for any number of processes, exact resume).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from focusdpo.data.parquet import INDEX_COLUMNS, decode_row, open_shard, read_row_group, shard_paths
from focusdpo.data.records import DipRecord


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


def record_item(rec: DipRecord) -> dict[str, Any]:
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

    Raises ValueError naming the records when K, sizes or ``m_d_patch`` differ (group records by
    :attr:`DipDataset.keys`, as ``focusdpo.train.batches`` does).
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
                             "m_d_patch; group them by DipDataset.keys (one group per batch, as "
                             "focusdpo.train.batches does)")
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
