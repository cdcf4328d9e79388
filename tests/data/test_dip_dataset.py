"""Training loader: batch layout, one bucket per batch, determinism, rank split, exact resume."""

from __future__ import annotations

import pytest
import torch

from focusdpo.data import DipDataset, collate_dip, read_records


def test_items_and_batch_layout(toy_set):
    ds = DipDataset(toy_set)
    recs = list(read_records(toy_set))
    assert len(ds) == 40 and ds.ids == [r.id for r in recs]
    idx = [i for i, r in enumerate(recs) if r.num_subjects == 3][:4]
    batch = collate_dip([ds[i] for i in idx])
    b, k = 4, 3
    assert batch["positive"].shape == batch["negative"].shape == (b, 3, 32, 32)
    assert batch["positive"].dtype == torch.float32 and 0 <= batch["positive"].min() <= batch["positive"].max() <= 1
    assert batch["m_prior"].shape == (b, 32, 32) and set(batch["m_prior"].unique().tolist()) <= {0.0, 1.0}
    assert batch["regions"].shape == (b, k, 32, 32) and len(batch["references"]) == len(batch["ref_masks"]) == k
    assert batch["references"][0].shape == (b, 3, 16, 16) and batch["ref_masks"][2].shape == (b, 16, 16)
    p = batch["m_d_patch"]
    assert isinstance(p, int) and batch["m_d"].shape == (b, 32 // p, 32 // p)
    assert batch["id"] == [recs[i].id for i in idx] and batch["prompt"][1] == recs[idx[1]].prompt
    r = recs[idx[2]]
    assert torch.equal(batch["negative"][2], torch.from_numpy(r.negative).permute(2, 0, 1).float() / 255)
    assert torch.equal(batch["regions"][2], torch.from_numpy(r.regions).float())
    assert torch.equal(batch["m_d"][2], torch.from_numpy(r.m_d))
    assert torch.equal(batch["references"][1][2], torch.from_numpy(r.references[1]).permute(2, 0, 1).float() / 255)
    outside = batch["m_prior"] == 0
    assert torch.equal(batch["negative"].permute(0, 2, 3, 1)[outside], batch["positive"].permute(0, 2, 3, 1)[outside])


def test_collate_refuses_mixed_k(toy_set):
    ds = DipDataset(toy_set)
    ks = [key[0] for key in ds.keys]
    with pytest.raises(ValueError, match="DipDataset.keys"):
        collate_dip([ds[ks.index(2)], ds[ks.index(3)]])


def test_streaming_cache_is_bounded(toy_set):
    one = DipDataset(toy_set)._row_group(0, 0).nbytes
    ds = DipDataset(toy_set, cache_bytes=2 * one)
    for i in range(len(ds)):
        ds[i]
        assert 1 <= len(ds._cache) <= 3 and ds._cached_bytes == sum(t.nbytes for t in ds._cache.values())
        assert ds._cached_bytes <= 2 * one or len(ds._cache) == 1
