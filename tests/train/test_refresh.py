"""On-policy DIP in the trainer (issue 16 point 1): exact resume across a refresh, the DIP invariant of the new
pairs, determinism, the batch mix, the per-round log and the config errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import tiny_config

from focusdpo.config import ConfigError, load_config
from focusdpo.data.dataset import collate_dip, record_item
from focusdpo.data.parquet import row_to_record
from focusdpo.data.records import DipRecord
from focusdpo.train import checkpoint as ckpt
from focusdpo.train.refresh import LOG_FILE, POOL_FILE, OnPolicy, read_rounds
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import train

REFRESH = dict(data__refresh_every=2, data__refresh_n=6, data__refresh_steps=3, data__refresh_judge="changed")


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def _rounds(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_rounds(run_dir)]


def _pool(path) -> list[DipRecord]:
    data = ckpt.load_checkpoint(path)["extra_files"][POOL_FILE]
    return [row_to_record(row) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


@pytest.fixture(scope="module")
def straight(tiny_env, tmp_path_factory):
    """A 5-step run with refresh rounds before steps 1, 3 and 5, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("refresh") / "run"
    cfg = tiny_config(*tiny_env, train__max_steps=5, train__checkpoint_every=2, train__output_dir=out, **REFRESH)
    return cfg, train(cfg)


def test_rounds_are_logged_per_round(straight) -> None:
    _, run = straight
    rows = read_rounds(run)
    assert [(r["round"], r["step"]) for r in rows] == [(0, 0), (1, 2), (2, 4)]
    for r in rows:
        assert r["candidates"] == 6 and r["kept"] + sum(r["rejected"].values()) == 6
        assert sum(r["kept_by_reason"].values()) == r["kept"] and r["judge"] == "changed"
        assert r["time_s"] > 0 and r["pool"] == r["kept"] > 0
        assert r["gap_kept"] is not None


def test_on_policy_pairs_keep_the_positive_outside_m_prior(straight) -> None:
    _, run = straight
    pool = _pool(ckpt.step_dir(run, 4))
    assert pool and all(rec.disruption == "on_policy" and rec.params["round"] == 1 for rec in pool)
    for rec in pool:
        rec.validate()  # the DIP invariant, the region union, the shapes
        outside = ~rec.m_prior
        assert np.array_equal(rec.negative[outside], rec.positive[outside])  # bit-identical outside M_prior
        assert (rec.negative[rec.m_prior] != rec.positive[rec.m_prior]).any()  # and really regenerated inside
        assert np.array_equal(rec.m_prior, rec.regions[rec.disrupted[0]])
        assert rec.source["on_policy_of"] == rec.id.split("@")[0]


def test_the_pairs_join_the_training_stream(straight, tiny_env, tmp_path) -> None:
    _, run = straight
    off = train(tiny_config(*tiny_env, train__max_steps=5, train__output_dir=tmp_path / "off"))
    mixed, plain = _losses(run), _losses(off)
    assert mixed[0] == pytest.approx(plain[0])  # step 1: LoRA at init, loss log 2 whatever the pairs
    assert mixed[1:] != plain[1:]


@pytest.mark.parametrize("every", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_resume_across_a_refresh_gives_the_same_losses(straight, tiny_env, tmp_path, every) -> None:
    """Checkpoint at step 2, resume to 5: with every=2 the resumed run starts with a round (at step 2), with
    every=3 it continues on the restored pool of round 0 and refreshes at step 3."""
    kw = {**REFRESH, "data__refresh_every": every}
    ref = tmp_path / "ref"
    train(tiny_config(*tiny_env, train__max_steps=5, train__checkpoint_every=2, train__output_dir=ref, **kw))
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=2, train__checkpoint_every=2, train__output_dir=out, **kw))
    train(tiny_config(*tiny_env, train__max_steps=5, train__checkpoint_every=2, train__output_dir=out, **kw),
          resume=True)
    assert _losses(out) == _losses(ref)
    assert _rounds(out) == _rounds(ref)
    assert [r["step"] for r in read_rounds(out)] == list(range(0, 5, every))
    if every == 2:
        assert _losses(out) == _losses(straight[1])


def test_a_checkpoint_without_refresh_state_is_refused(tiny_env, tmp_path) -> None:
    from focusdpo.train.trainer import TrainingError

    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=2, train__checkpoint_every=2, train__output_dir=out))
    with pytest.raises(TrainingError, match="data.refresh_every: 0 -> 2"):  # the changed config is refused
        train(tiny_config(*tiny_env, train__max_steps=4, train__output_dir=out, **REFRESH), resume=True)
    op = _FakePool(tiny_config(*tiny_env, **REFRESH), [])
    with pytest.raises(ConfigError, match="holds no refresh state"):
        op.load_state_files(ckpt.load_checkpoint(ckpt.step_dir(out, 2))["extra_files"], 2)


def test_rounds_are_deterministic_for_a_seed(tiny_env, tmp_path) -> None:
    from focusdpo.backbones import load_backbone
    from focusdpo.data import ensure_toy_dip
    from focusdpo.data.dataset import DipDataset
    from focusdpo.train.refresh import build_judge

    def one_round(seed: int) -> list[DipRecord]:
        cfg = tiny_config(*tiny_env, train__seed=seed, **REFRESH)
        backbone = load_backbone(cfg.model)
        backbone.add_lora(cfg.lora)
        op = OnPolicy(cfg, DipDataset(ensure_toy_dip(cfg)), backbone, build_judge(cfg), tmp_path, main_process=False)
        op.run_round(0)
        return op.pool

    a, b, c = one_round(0), one_round(0), one_round(1)
    assert [r.id for r in a] == [r.id for r in b]
    assert all(np.array_equal(x.negative, y.negative) for x, y in zip(a, b, strict=True))
    assert [r.id for r in a] != [r.id for r in c]


def test_toy_judge_round_keeps_only_worse_negatives(tiny_env, tmp_path) -> None:
    from focusdpo.backbones import load_backbone
    from focusdpo.data import ensure_toy_dip
    from focusdpo.data.dataset import DipDataset
    from focusdpo.train.refresh import build_judge

    cfg = tiny_config(*tiny_env, **{**REFRESH, "data__refresh_judge": "toy"})
    backbone = load_backbone(cfg.model)
    backbone.add_lora(cfg.lora)
    op = OnPolicy(cfg, DipDataset(ensure_toy_dip(cfg)), backbone, build_judge(cfg), tmp_path)
    row = op.run_round(0)
    assert row["kept"] == len(op.pool) and row["kept"] + sum(row["rejected"].values()) == 6
    assert set(row["kept_by_reason"]) <= {"lost_fidelity", "gained_leakage"}
    assert all(rec.params["gap"] > 0 for rec in op.pool)  # the toy score (fidelity - leakage) fell
    assert json.loads((tmp_path / LOG_FILE).read_text().splitlines()[0])["kept"] == row["kept"]


class _FakePool(OnPolicy):
    def __init__(self, cfg, items):
        self.cfg = cfg
        self.pool = [None] * len(items)
        self._items = items
        from focusdpo.train.refresh import batch_key

        self._keys = [batch_key(it) for it in items]


def _item(i: int, k: int = 2) -> dict:
    return {"id": f"r{i}", "prompt": "p", "disruption": "x", "positive": torch.full((3, 4, 4), float(i)),
            "negative": torch.zeros(3, 4, 4), "m_prior": torch.zeros(4, 4), "regions": torch.zeros(k, 4, 4),
            "references": [torch.zeros(3, 2, 2)] * k, "ref_masks": [torch.ones(2, 2)] * k, "m_d": torch.zeros(1, 1),
            "m_d_patch": 4}


def test_mix_replaces_the_global_batch_tail_for_any_number_of_processes() -> None:
    cfg = load_config(None, ["data.refresh_mix=0.5"])
    pool = _FakePool(cfg, [_item(100 + i) for i in range(5)] + [_item(200, k=3)])
    batch = [_item(i) for i in range(4)]
    one = pool.mix(collate_dip(batch), step=7, micro=0, rank=0, world=1)
    assert one["id"][:2] == ["r0", "r1"] and all(i.startswith("r10") for i in one["id"][2:])
    assert len(set(one["id"][2:])) == 2  # without replacement while the pool allows
    two = [pool.mix(collate_dip(batch[r * 2:(r + 1) * 2]), step=7, micro=0, rank=r, world=2) for r in range(2)]
    assert two[0]["id"] + two[1]["id"] == one["id"]
    assert torch.equal(torch.cat([two[0]["positive"], two[1]["positive"]]), one["positive"])
    # a batch of another subject count only takes pairs of its own key; none there: unchanged
    other = [_item(i, k=3) for i in range(2)]
    assert pool.mix(collate_dip(other), step=7, micro=0, rank=0, world=1)["id"] == ["r0", "r200"]
    assert pool.mix(collate_dip([_item(0, k=1), _item(1, k=1)]), 7, 0, 0, 1)["id"] == ["r0", "r1"]


def test_record_item_round_trips_through_collate(tiny_env) -> None:
    from focusdpo.data import ensure_toy_dip
    from focusdpo.data.dataset import DipDataset, uncollate_dip

    ds = DipDataset(ensure_toy_dip(tiny_config(*tiny_env)))
    items = [ds[0], ds[1]]
    again = uncollate_dip(collate_dip(items))
    for a, b in zip(items, again, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["positive"], b["positive"])
        assert all(torch.equal(x, y) for x, y in zip(a["references"], b["references"], strict=True))
    assert torch.equal(record_item(ds.record(0))["negative"], items[0]["negative"])


@pytest.mark.parametrize(("override", "message"), [
    ("data.refresh_mix=1.5", "data.refresh_mix=1.5 is invalid: allowed in [0, 1]"),
    ("data.refresh_judge=oracle", "data.refresh_judge='oracle' is invalid: allowed one of toy, matching, changed"),
    ("data.refresh_every=-1", "data.refresh_every=-1 is invalid"),
    ("data.refresh_strength=0", "data.refresh_strength=0"),
])
def test_bad_refresh_config_names_the_field(override, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(None, [override])


def test_matching_judge_round_with_a_saved_tiny_dino(tiny_env, tmp_path) -> None:
    """data.refresh_judge=matching loads eval.dino_model (a tiny random ViT saved here) and judges a round."""
    from transformers import ViTConfig, ViTModel

    from focusdpo.backbones import load_backbone
    from focusdpo.data import ensure_toy_dip
    from focusdpo.data.dataset import DipDataset
    from focusdpo.train.refresh import build_judge

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    cfg = tiny_config(*tiny_env, **{**REFRESH, "data__refresh_judge": "matching", "data__refresh_margin": 0.0,
                                    "eval__dino_model": tmp_path / "dino"})
    backbone = load_backbone(cfg.model)
    backbone.add_lora(cfg.lora)
    op = OnPolicy(cfg, DipDataset(ensure_toy_dip(cfg)), backbone, build_judge(cfg), tmp_path, main_process=False)
    row = op.run_round(0)
    assert row["judge"] == "matching" and row["kept"] + sum(row["rejected"].values()) == 6
    reasons = set(row["kept_by_reason"]) | set(row["rejected"])
    assert reasons <= {"confusion", "similarity_drop", "not_worse", "positive_confused"}
    assert all(rec.params["reason"] in ("confusion", "similarity_drop") for rec in op.pool)


def test_matching_judge_with_the_toy_embedder_flags_planted_leaks() -> None:
    """data.refresh_embedder=toy: the matching judge runs offline on the toy world's embedding; a subject redrawn
    with all four of another subject's leakage attributes is kept as a negative, the positive itself is not."""
    from focusdpo.judges import Candidate, MatchingJudge
    from focusdpo.train.refresh import build_judge
    from focusdpo.world import World
    from focusdpo.world.embedding import plant_leak

    cfg = load_config(None, ["data.refresh_judge=matching", "data.refresh_embedder=toy"])
    judge = build_judge(cfg)
    assert isinstance(judge, MatchingJudge)
    world = World(cfg.world)
    rng = np.random.default_rng(4)
    kept = 0
    scenes = [world.sample_scene(rng, "train", 2) for _ in range(20)]
    for s in scenes:
        leaked = plant_leak(world, s, 0, 1, ["class", "body", "pattern", "detail"])
        same = judge.judge(Candidate(s.image, s.image, s.masks, s.prompt, s.references), 0)
        assert not same.keep and same.reason == "not_worse" and same.gap == 0.0
        verdict = judge.judge(Candidate(s.image, leaked.image, s.masks | leaked.masks, s.prompt, s.references), 0)
        kept += verdict.keep
    assert kept >= 18
    with pytest.raises(ConfigError, match="data.refresh_embedder='clip' is invalid"):
        load_config(None, ["data.refresh_embedder=clip"])
