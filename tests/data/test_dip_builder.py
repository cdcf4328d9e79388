"""The builders: determinism, train-only identities, pair invariants, M_d, bad input, card, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dip_fixtures import make_scene
from PIL import Image

from focusdpo.data import build_manifest_dip, build_toy_dip, ensure_toy_dip, read_records
from focusdpo.data.parquet import shard_paths
from focusdpo.world import World


def test_toy_build_is_deterministic(tmp_path, toy_cfg, toy_set):
    build_toy_dip(toy_cfg, tmp_path / "a", n=40, seed=3)
    for a, b in zip(shard_paths(toy_set), shard_paths(tmp_path / "a"), strict=True):
        assert a.read_bytes() == b.read_bytes()
    build_toy_dip(toy_cfg, tmp_path / "b", n=5, seed=4)
    other = [r.positive for r in read_records(tmp_path / "b")]
    first = [r.positive for r in read_records(toy_set)][:5]
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_toy_prefix_does_not_depend_on_n(tmp_path, toy_cfg, toy_set):
    build_toy_dip(toy_cfg, tmp_path, n=7, seed=3)
    short = list(read_records(tmp_path))
    long = list(read_records(toy_set))[:7]
    for a, b in zip(short, long, strict=True):
        assert a.id == b.id and np.array_equal(a.negative, b.negative) and np.array_equal(a.m_d, b.m_d)


def test_toy_uses_only_train_identities(toy_cfg, toy_set):
    world = World(toy_cfg.world)
    train = set(world.train_ids)
    swaps = 0
    for rec in read_records(toy_set):
        assert set(rec.source["identities"]) <= train and rec.source["split"] == "train"
        if rec.disruption == "identity_swap":
            new = rec.params["new_identity"]
            old = rec.source["identities"][rec.disrupted[0]]
            assert new in train and world.identities[new].cls == world.identities[old].cls and new != old
            swaps += 1
    assert swaps > 0


def test_toy_records_hold_the_pair_invariants(toy_cfg, toy_set):
    from focusdpo.focus import complexity_map

    recs = list(read_records(toy_set))
    assert len(recs) == 40 and len({r.id for r in recs}) == 40
    assert {r.disruption for r in recs} == set(toy_cfg.data.disruptions)
    for r in recs:
        assert toy_cfg.world.min_subjects <= r.num_subjects <= toy_cfg.world.max_subjects
        assert np.array_equal(r.m_prior, r.regions[r.disrupted].any(0))
        assert np.array_equal(r.negative[~r.m_prior], r.positive[~r.m_prior])
        assert (r.negative != r.positive)[r.m_prior].any()
        x = torch.from_numpy(r.positive).permute(2, 0, 1)[None].float() / 255
        p = toy_cfg.model.patch
        want = complexity_map(x, p, sigma=toy_cfg.focus.sigma, bins=toy_cfg.focus.bins)[0].numpy()
        assert r.m_d_patch == p and np.allclose(r.m_d, want, atol=1e-6)


def test_card_and_rejected(toy_cfg, toy_set):
    card = json.loads((toy_set / "card.json").read_text())
    assert card["records"] == 40 and card["rejected"] == 0 and card["kind"] == "toy"
    assert sum(card["disruption_counts"].values()) == 40 and card["seed"] == 3
    assert card["m_d_patch"] == toy_cfg.model.patch
    assert abs(sum(card["disruption_mix"].values()) - 1) < 1e-9 and len(card["shards"]) == 3
    assert (toy_set / "rejected.jsonl").read_text() == "" and card["never_drawn"] == {}


def test_one_subject_build_draws_only_one_subject_disruptions(tmp_path):
    from focusdpo.config import load_config

    cfg = load_config(None, ["world.min_subjects=1", "world.max_subjects=1"])
    s = build_toy_dip(cfg, tmp_path, n=20, seed=0, patch=4)
    assert s.written == 20 and set(s.disruptions) <= {"detail_erase", "patch_shuffle", "identity_swap"}
    assert all(r.m_d.shape == (8, 8) for r in read_records(tmp_path))


def test_patch_must_divide_the_scene(tmp_path, toy_cfg):
    with pytest.raises(ValueError, match="does not divide world.scene_size=32"):
        build_toy_dip(toy_cfg, tmp_path / "x", n=2, patch=3)
    assert not (tmp_path / "x").exists()


def test_refuses_to_overwrite(tmp_path, toy_cfg):
    build_toy_dip(toy_cfg, tmp_path, n=2, seed=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_toy_dip(toy_cfg, tmp_path, n=2, seed=0)
    assert build_toy_dip(toy_cfg, tmp_path, n=3, seed=0, overwrite=True).written == 3


def test_ensure_toy_dip_caches(tmp_path, toy_cfg):
    from focusdpo.config import load_config

    cfg = load_config(None, [f"data.cache_dir={tmp_path}", "data.n_records=6"])
    path = ensure_toy_dip(cfg)
    stamp = (path / "data-00000.parquet").stat().st_mtime_ns
    assert ensure_toy_dip(cfg) == path and (path / "data-00000.parquet").stat().st_mtime_ns == stamp
    other = ensure_toy_dip(load_config(None, [f"data.cache_dir={tmp_path}", "data.n_records=6", "focus.bins=16"]))
    assert other != path and len(list(read_records(other))) == 6
    assert not list(tmp_path.glob("*.tmp-*"))


def _manifest_with_every_bad_case(root):
    lines = []
    for i in range(3):
        img, regions = make_scene(i, 2, size=32)
        Image.fromarray(img).save(root / f"t{i}.png")
        for j in range(2):
            Image.fromarray(regions[j].astype(np.uint8) * 255).save(root / f"m{i}{j}.png")
            Image.fromarray(img[:16, :16]).save(root / f"r{i}{j}.png")
        lines.append({"prompt": f"two things {i}", "target": f"t{i}.png", "id": f"good{i}",
                      "target_masks": [f"m{i}{j}.png" for j in range(2)],
                      "references": [{"image": f"r{i}{j}.png"} for j in range(2)]})
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = (root / "t0.png").read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "small_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "empty_mask.png")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(root / "huge.png")
    bad = {"unreadable": ("target", "bad.png"), "truncated": ("target", "trunc.png"),
           "mask_size": ("mask", "small_mask.png"), "empty_mask": ("mask", "empty_mask.png"),
           "missing_ref": ("ref", "nope.png"), "escape": ("ref", "../escape.png"), "pixels": ("target", "huge.png")}
    for name, (where, file) in bad.items():
        rec = json.loads(json.dumps(lines[0]))
        rec["id"] = name
        if where == "target":
            rec["target"] = file
        elif where == "mask":
            rec["target_masks"][1] = file
        else:
            rec["references"][1]["image"] = file
        lines.append(rec)
    one = {"prompt": "one thing", "target": "t1.png", "id": "single", "target_masks": ["m10.png"],
           "references": [{"image": "r10.png"}]}
    path = root / "set.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines + [one]) + "\n{broken json\n")
    return path, set(bad)


def test_manifest_build_lists_bad_records_and_keeps_good_ones(tmp_path):
    from focusdpo.config import load_config

    root = tmp_path / "m"
    root.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "escape.png")  # exists, but outside
    manifest, bad = _manifest_with_every_bad_case(root)
    cfg = load_config(None, ["data.max_pixels=4096"])
    s = build_manifest_dip(cfg, manifest, tmp_path / "out", seed=1, patch=8)
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert s.written == 4 and s.rejected == len(bad) + 1 == len(rejected)
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert set(reasons) == bad | {None}
    assert "cannot be read" in reasons["unreadable"] and "cannot be read" in reasons["truncated"]
    assert "10x10" in reasons["mask_size"] and "empty" in reasons["empty_mask"]
    assert "missing" in reasons["missing_ref"] and "leaves" in reasons["escape"]
    assert "over the limit 4096" in reasons["pixels"] and "not valid JSON" in reasons[None]
    assert all(r["record"] for r in rejected)
    recs = {r.id: r for r in read_records(tmp_path / "out")}
    assert set(recs) == {"good0", "good1", "good2", "single"}
    assert recs["single"].disruption in ("detail_erase", "patch_shuffle") and recs["single"].m_d.shape == (4, 4)
    img, regions = make_scene(1, 2, size=32)
    assert np.array_equal(recs["good1"].positive, img) and np.array_equal(recs["good1"].regions, regions)
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["records"] == 4 and card["rejected"] == len(bad) + 1 and card["kind"] == "manifest"
    assert card["never_drawn"]["identity_swap"] == "needs swap_identity" and s.never_drawn == card["never_drawn"]


def test_manifest_build_with_size_is_one_bucket_and_deterministic(tmp_path):
    from focusdpo.config import load_config
    from focusdpo.data import DipDataset

    root = tmp_path / "m"
    root.mkdir()
    manifest, _ = _manifest_with_every_bad_case(root)
    cfg = load_config(None, ["data.max_pixels=4096"])
    a = build_manifest_dip(cfg, manifest, tmp_path / "a", seed=2, patch=8, size=24, ref_size=8)
    b = build_manifest_dip(cfg, manifest, tmp_path / "b", seed=2, patch=8, size=24, ref_size=8)
    assert b.written == 4
    assert a.written == 4 and a.rejected == b.rejected == 8
    for x, y in zip(shard_paths(tmp_path / "a"), shard_paths(tmp_path / "b"), strict=True):
        assert x.read_bytes() == y.read_bytes()
    ds = DipDataset(tmp_path / "a")
    assert {key[1:] for key in ds.keys} == {(24, 24, ((8, 8),) * 2), (24, 24, ((8, 8),))}
    with pytest.raises(ValueError, match="multiple of the patch"):
        build_manifest_dip(cfg, manifest, tmp_path / "c", patch=8, size=20)


def test_regenerate_plugin_through_the_build(tmp_path):
    """A stand-in for the backbone's `regenerate`: drawn only when the build gets the backbone in `extras`."""
    from focusdpo.config import load_config
    from focusdpo.data import disruptions as D

    calls = []

    def fake_regenerate(image, regions, target, rng, ctx):
        calls.append(ctx.extras["backbone"])
        return np.full_like(image, 7), {"steps": 3}

    previous = D.registered_disruptions().get("regenerate")
    D.register_disruption("regenerate", fake_regenerate, needs=("backbone",), replace=True)
    try:
        cfg = load_config(None, ["data.disruptions={regenerate: 3.0, detail_erase: 1.0}"])
        s = build_toy_dip(cfg, tmp_path / "a", n=12, seed=0, extras={"backbone": "bb"})
        assert s.disruptions["regenerate"] >= 6 and set(calls) == {"bb"}
        for r in read_records(tmp_path / "a"):
            if r.disruption == "regenerate":
                assert (r.negative[r.m_prior] == 7).all() and r.params == {"steps": 3}
                assert np.array_equal(r.negative[~r.m_prior], r.positive[~r.m_prior])
        s = build_toy_dip(cfg, tmp_path / "b", n=4, seed=0)
        assert s.disruptions == {"detail_erase": 4} and s.never_drawn == {"regenerate": "needs backbone"}
    finally:
        D._REGISTRY.pop("regenerate")
        if previous is not None:
            D._REGISTRY["regenerate"] = previous


def test_unregistered_disruption_in_the_mix_fails_before_building(tmp_path):
    from focusdpo.config import load_config
    from focusdpo.data import DisruptionError
    from focusdpo.data import disruptions as D

    previous = D._REGISTRY.pop("regenerate", None)  # as in an installation without the backbone plug-in
    try:
        cfg = load_config(None, ["data.disruptions={regenerate: 1.0}"])
        with pytest.raises(DisruptionError, match="regenerate.*not registered"):
            build_toy_dip(cfg, tmp_path / "out", n=2, seed=0)
        assert not (tmp_path / "out").exists()
    finally:
        if previous is not None:
            D._REGISTRY["regenerate"] = previous


def test_dip_build_command_with_regenerate_uses_the_shipped_base(tmp_path):
    """`focusdpo dip build` with regenerate in the mix loads the base itself (plugin_extras); every negative
    differs from its positive only inside M_prior."""
    from typer.testing import CliRunner

    import focusdpo.data.regenerate as regen
    from focusdpo.cli import app
    from focusdpo.data import disruptions as D

    if "regenerate" not in D.registered_disruptions():  # another test may have swapped the plug-in out
        D.register_disruption("regenerate", regen.regenerate, needs=("backbone",), replace=True)
    out = tmp_path / "dip"
    result = CliRunner().invoke(app, ["dip", "build", "--world", "toy", "--n", "3", "--seed", "1", "--out", str(out),
                                      "data.disruptions={regenerate: 1.0}"])
    assert result.exit_code == 0, result.output
    records = list(read_records(out))
    assert len(records) >= 1
    for rec in records:
        assert rec.disruption == "regenerate"
        assert np.array_equal(rec.negative[~rec.m_prior], rec.positive[~rec.m_prior])
