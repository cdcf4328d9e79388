"""Training loader: batch layout, one bucket per batch, determinism, rank split, exact resume."""

from __future__ import annotations

import pytest
import torch

from focusdpo.data import BucketBatchSampler, DipDataset, collate_dip, make_dataloader, read_records


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
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_dip([ds[ks.index(2)], ds[ks.index(3)]])


def test_streaming_cache_is_bounded(toy_set):
    one = DipDataset(toy_set)._row_group(0, 0).nbytes
    ds = DipDataset(toy_set, cache_bytes=2 * one)
    for i in range(len(ds)):
        ds[i]
        assert 1 <= len(ds._cache) <= 3 and ds._cached_bytes == sum(t.nbytes for t in ds._cache.values())
        assert ds._cached_bytes <= 2 * one or len(ds._cache) == 1


def test_bucket_sampler_covers_each_record_once_with_one_key_per_batch():
    keys = [(2, 32, 32)] * 23 + [(3, 32, 32)] * 17 + [(1, 64, 64)] * 5
    s = BucketBatchSampler(keys, 4, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(45))
    assert all(len({keys[i] for i in b}) == 1 for b in batches)
    assert len(batches) == 6 + 5 + 2 == len(BucketBatchSampler(keys, 4))
    assert batches == list(BucketBatchSampler(keys, 4, seed=0))
    s.set_epoch(1)
    assert list(s) != batches
    dl = BucketBatchSampler(keys, 4, drop_last=True)
    assert all(len(b) == 4 for b in dl) and len(list(dl)) == 5 + 4 + 1


def test_rank_split_is_disjoint_and_even():
    keys = [(2, 32, 32)] * 30 + [(3, 32, 32)] * 11
    parts = [list(BucketBatchSampler(keys, 4, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    flat = [i for p in parts for b in p for i in b]
    assert len(flat) == len(set(flat))
    full = list(BucketBatchSampler(keys, 4, seed=5))
    assert [b for p in zip(*parts, strict=True) for b in p] == full[: 3 * len(parts[0])]
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(keys, 4, rank=3, world_size=3)


def _ids(batches):
    return [tuple(b["id"]) for b in batches]


def test_loader_resumes_exactly(toy_set, toy_cfg):
    ref = make_dataloader(toy_set, toy_cfg, seed=7, batch_size=4)
    epoch0 = _ids(ref)
    epoch1 = _ids(ref)
    assert ref.state_dict() == {"epoch": 2, "batches": 0} and epoch0 != epoch1
    run = make_dataloader(toy_set, toy_cfg, seed=7, batch_size=4)
    it = iter(run)
    head = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = make_dataloader(toy_set, toy_cfg, seed=7, batch_size=4)
    resumed.load_state_dict(state)
    assert _ids(head) + _ids(resumed) == epoch0
    assert _ids(resumed) == epoch1
    again = make_dataloader(toy_set, toy_cfg, seed=7, batch_size=4)
    b0 = next(iter(again))
    assert torch.equal(b0["negative"], head[0]["negative"]) and torch.equal(b0["m_d"], head[0]["m_d"])


def test_workers_give_the_same_batches(toy_set, toy_cfg):
    from focusdpo.config import load_config

    cfg = load_config(None, ["data.num_workers=2"])
    a = [b["positive"] for b in make_dataloader(toy_set, toy_cfg, seed=1, batch_size=8)]
    b = [b["positive"] for b in make_dataloader(toy_set, cfg, seed=1, batch_size=8)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sum(x.shape[0] for x in a) == 40
