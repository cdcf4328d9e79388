"""Toy benchmark runner: paired scenes and noise across methods, metrics.json shape and spread, outputs, the
method loading of run folders, and DreamBench generation with the tiny backbone."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from focusdpo.config import load_config
from focusdpo.eval import toy
from focusdpo.eval.methods import MethodError, load_method, resolve_methods
from focusdpo.world import World
from focusdpo.world.metrics import score_scene

SMALL = ["eval.n_scenes=2", "eval.seeds=[0,1]", "eval.subject_counts=[2,3]", "eval.batch_size=4",
         "eval.grid_scenes=2", "sample.steps=1"]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A randomly initialised tiny base checkpoint (the shipped base may not exist yet)."""
    from focusdpo.backbones.flux import build_tiny, save_tiny

    cfg = load_config(None, [])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    save_tiny(build_tiny(cfg.model, World(cfg.world).vocabulary()), path, cfg.model)
    return path


def _cfg(base_ckpt, *extra):
    return load_config(None, [*SMALL, f"model.checkpoint={base_ckpt}", *extra])


def _run_folder(root: Path, cfg, objective: str, scale: float) -> Path:
    """A finished run folder: config.yaml, lora.safetensors (B scaled by ``scale``; 0 = no change), metrics.csv."""
    from focusdpo.lora import save_lora

    run = root / f"{objective}-{scale}"
    run.mkdir()
    cfg = load_config(None, [*SMALL, f"model.checkpoint={cfg.model.checkpoint}", f"train.objective={objective}"])
    cfg.save(run / "config.yaml")
    backbone = load_method(cfg, None)
    backbone.add_lora(cfg.lora)
    gen = torch.Generator().manual_seed(1)
    sd = {k: (torch.randn(v.shape, generator=gen) * (scale if ".lora_B." in k else 0.1))
          for k, v in backbone.lora_state_dict().items()}
    save_lora(run / "lora.safetensors", sd)
    rows = ["step,loss,implicit_acc,margin,a,gate,w_in_prior,w_out_prior"]
    rows += [f"{s},{0.7 - 0.01 * s},{0.5},{0.01 * s},{0.4},{0},{1.5},{0.8}" for s in range(1, 21)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


def test_scenes_and_noise_are_fixed_and_shared(base_ckpt):
    cfg = _cfg(base_ckpt)
    world = World(cfg.world)
    a = toy.heldout_scenes(world, 2, [2, 3])
    b = toy.heldout_scenes(world, 2, [2, 3])
    assert [s.prompt for s in a[3]] == [s.prompt for s in b[3]] and all(len(s.identities) == 3 for s in a[3])
    heldout = set(world.heldout_ids)
    assert all(i.id in heldout for ks in a.values() for s in ks for i in s.identities)
    assert toy.batch_seed(0, 2, 0, 1) != toy.batch_seed(1, 2, 0, 1) != toy.batch_seed(0, 3, 0, 1)
    backbone = load_method(cfg, None)
    x = toy.sample_scenes(backbone, a[2], cfg, seed=0, sample=0)
    y = toy.sample_scenes(backbone, a[2], cfg, seed=0, sample=0)
    z = toy.sample_scenes(backbone, a[2], cfg, seed=1, sample=0)
    assert x[0].shape == (32, 32, 3) and x[0].dtype == np.uint8
    assert all(np.array_equal(i, j) for i, j in zip(x, y, strict=True))
    assert not np.array_equal(x[0], z[0])


def test_planted_perfect_generator_scores_the_ceiling(base_ckpt, monkeypatch, tmp_path):
    """With images replaced by the ground-truth renders, fidelity is 1 and leakage 0 for every seed."""
    monkeypatch.setattr(toy, "sample_units", lambda backbone, scenes, cfg: {
        (seed, j): [s.image for s in scenes] for seed in cfg.eval.seeds for j in range(cfg.eval.samples_per_prompt)})
    metrics = toy.evaluate_toy(_cfg(base_ckpt), {"base": None}, tmp_path)
    m = metrics["base"]
    assert m["fidelity"] == {"mean": 1.0, "std": 0.0, "per_seed": [1.0, 1.0], "ci": [1.0, 1.0], "se_boot": 0.0}
    assert m["units"]["fidelity"] == [1.0] * 8 and m["units"]["keys"][:3] == [[2, 0, 0, 0], [2, 0, 0, 1], [2, 1, 0, 0]]
    per_subject = m["units"]["subjects"]  # one value per subject of each unit's scene: K = 2 then K = 3
    assert [len(v) for v in per_subject["fidelity"]] == [k for k, *_ in m["units"]["keys"]]
    assert all(v == 1.0 for row in per_subject["fidelity"] for v in row)
    assert all(v == 0.0 for row in per_subject["leakage"] for v in row)
    assert m["leakage"]["per_seed"] == [0.0, 0.0] and m["prompt"]["mean"] == 1.0
    assert m["by_subjects"]["3"]["fidelity"]["mean"] == 1.0 and m["details"]["leak_rate"]["mean"] == 0.0


@pytest.mark.slow  # ~5 s idle, ~30 s on a loaded 2-core machine
def test_evaluate_toy_base_and_runs(base_ckpt, tmp_path):
    cfg = _cfg(base_ckpt)
    zero = _run_folder(tmp_path, cfg, "dpo", 0.0)  # B = 0: the adapters change nothing
    moved = _run_folder(tmp_path, cfg, "focusdpo", 5.0)
    methods = resolve_methods([zero, moved], base=True)
    assert list(methods) == ["base", "dpo", "focusdpo"]
    out = tmp_path / "out"
    metrics = toy.evaluate_toy(cfg, methods, out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    base, dpo, focus = metrics["base"], metrics["dpo"], metrics["focusdpo"]
    for name in ("fidelity", "leakage", "prompt"):
        assert dpo[name] == base[name]  # same scenes, same noise, same weights -> identical, seed by seed
        per_seed = base[name]["per_seed"]
        assert len(per_seed) == 2 and base[name]["std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert base[name]["mean"] == pytest.approx(np.mean(per_seed))
        assert set(base["by_subjects"]) == {"2", "3"} and name in base["by_subjects"]["2"]
    assert focus["run"] == str(moved) and base["run"] is None and base["seeds"] == [0, 1]
    # paired intervals: the B = 0 run equals the base unit by unit, so its difference is exactly 0
    same = dpo["vs_base"]["fidelity"]
    assert same["mean"] == 0.0 and same["ci"] == [0.0, 0.0] and not same["excludes_zero"]
    assert "vs_dpo" in focus and "vs_base" not in base and "vs_dpo" not in dpo
    assert len(focus["units"]["leakage"]) == 2 * 2 * 2 and focus["units"]["keys"] == base["units"]["keys"]
    lo, hi = focus["fidelity"]["ci"]
    assert lo <= np.mean(toy.unit_scores(focus, "fidelity")) <= hi
    # the pooled per-seed value is the mean over all scenes of both counts (2 + 2 scenes here)
    world = World(cfg.world)
    scenes = toy.heldout_scenes(world, 2, [2, 3])
    backbone = load_method(cfg, moved)
    fid = [score_scene(img, s, world)["fidelity"] for k in (2, 3)
           for img, s in zip(toy.sample_scenes(backbone, scenes[k], cfg, 1, 0), scenes[k], strict=True)]
    assert focus["fidelity"]["per_seed"][1] == pytest.approx(np.mean(fid))
    # leakage = chance + transfer, unit by unit; the B = 0 run's transfer difference to the base is exactly 0
    for m in (base, focus):
        leak, chance, transfer = (toy.unit_scores(m, h) for h in ("leakage", "leakage_chance", "transfer"))
        ok = np.isfinite(leak)
        assert np.allclose(chance[ok] + transfer[ok], leak[ok])
        assert m["leakage_split"]["transfer"]["mean"] == pytest.approx(np.nanmean(transfer))
    assert dpo["leakage_split"]["vs_base"]["transfer"]["mean"] == 0.0 and "vs_base" not in base["leakage_split"]
    report = (out / "report.md").read_text()
    assert "## Leakage: chance and transfer" in report and "| dpo |" in report.split("chance and transfer")[1]
    assert "| focusdpo |" in report and "Paired difference to `base`" in report and "| dpo | 0.000 ± 0.000" in report
    assert "- dpo vs base: no detectable difference in fidelity +0.000 [0.000, 0.000]" in report
    with Image.open(out / "grid_3subjects.png") as im:
        # 2 scenes; 3 refs of 16 px + truth and 3 method columns of 32 px, pad 2, x4, plus the 14 px label header
        assert im.size == (4 * (2 + 3 * 18 + 4 * 34), 14 + 4 * (2 + 2 * 34))
    assert (out / "metrics.png").is_file() and (out / "curves_focusdpo.png").is_file()


def test_fast_path_draws_the_legacy_noise_and_scores_the_same(tmp_path):
    """Old (per-batch ``sample_scenes``) and new (``sample_units``: encodings once, chunks across seeds and
    samples, LoRA merged) paths on the shipped base and a LoRA run: the same noise, the same per-unit scores,
    images equal up to float rounding (a few values off by 1 in uint8)."""
    from focusdpo.backbones import shipped_base_path
    from focusdpo.sampling import initial_noise

    cfg = load_config(None, [f"model.checkpoint={shipped_base_path()}", "eval.n_scenes=3", "eval.seeds=[0,1]",
                             "eval.samples_per_prompt=2", "eval.batch_size=2",
                             "eval.chunk=4", "eval.subject_counts=[2,3]", "sample.steps=4"])
    world = World(cfg.world)
    scenes = toy.heldout_scenes(world, 3, [2, 3])
    noise = toy.unit_noise(scenes[3], cfg, [(1, 0), (1, 1)], (8, 8), 48)
    legacy = [initial_noise((n, 64, 48), toy.batch_seed(1, 3, j, b)) for j in (0, 1) for b, n in ((0, 2), (1, 1))]
    assert torch.equal(noise, torch.cat(legacy))
    run = _run_folder(tmp_path, cfg, "dpo", 2.0)
    for backbone in (load_method(cfg, None), load_method(cfg, run)):
        old, old_first = toy.score_method(backbone, world, scenes, cfg, legacy=True)
        new, new_first = toy.score_method(backbone, world, scenes, cfg)
        assert toy.unit_table(old, 2) == toy.unit_table(new, 2)
        a, b = np.stack(old_first[3]).astype(int), np.stack(new_first[3]).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    assert backbone.lora_state_dict()  # the adapters are still attached after the merged evaluation
    with torch.no_grad():
        x = torch.rand(1, 64, 48)
        t = torch.full((1,), 0.5)
        text = backbone.encode_prompts([scenes[2][0].prompt])
        refs = [backbone.encode_images(torch.rand(1, 3, 16, 16))]
        before = backbone.predict(x, t, text, refs, (8, 8))[0]
        with toy.adapters_merged(backbone.trainable()):
            merged = backbone.predict(x, t, text, refs, (8, 8))[0]
        after = backbone.predict(x, t, text, refs, (8, 8))[0]
    assert torch.allclose(before, merged, atol=1e-5) and torch.equal(before, after)


@pytest.mark.slow  # two spawned workers import torch: ~10-20 s on a loaded 2-core machine
def test_worker_processes_give_the_same_metrics(base_ckpt, tmp_path):
    cfg = _cfg(base_ckpt, "eval.grid_scenes=0", "eval.seeds=[0]")
    run = _run_folder(tmp_path, cfg, "dpo", 2.0)
    one = toy.evaluate_toy(cfg, {"base": None, "dpo": run}, tmp_path / "one")
    two = toy.evaluate_toy(cfg.with_overrides(["eval.workers=2"]), {"base": None, "dpo": run}, tmp_path / "two")
    for m in ("base", "dpo"):
        assert one[m]["units"] == two[m]["units"] and one[m]["leakage"] == two[m]["leakage"]
    assert one["dpo"]["vs_base"] == two["dpo"]["vs_base"]


def test_method_errors_name_the_fix(base_ckpt, tmp_path):
    cfg = _cfg(base_ckpt)
    with pytest.raises(MethodError, match="nothing to evaluate"):
        resolve_methods([], base=False)
    with pytest.raises(MethodError, match="no config.yaml"):
        resolve_methods([tmp_path], base=True)
    a = _run_folder(tmp_path, cfg, "sft", 0.0)
    b = tmp_path / "second"
    b.mkdir()
    (b / "config.yaml").write_text((a / "config.yaml").read_text())
    assert list(resolve_methods([a, b], base=False)) == [f"sft-{a.name}", "sft-second"]
    with pytest.raises(MethodError, match="no lora.safetensors"):
        load_method(cfg, b)
    other_world = load_config(None, [*SMALL, "world.seed=5"])
    with pytest.raises(MethodError, match="another world .*seed"):
        load_method(other_world, a)


def test_eval_command_toy(base_ckpt, tmp_path):
    from typer.testing import CliRunner

    from focusdpo.cli import app

    out = tmp_path / "out"
    args = ["eval", "--benchmark", "toy", "--base", "--out", str(out), *SMALL, "eval.grid_scenes=0",
            "eval.subject_counts=[2]", f"model.checkpoint={base_ckpt}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "base: fidelity" in result.output
    assert list(json.loads((out / "metrics.json").read_text())) == ["base"]
    assert not list(out.glob("grid_*.png"))
    result = CliRunner().invoke(app, ["eval", "--benchmark", "toy", "--out", str(out)])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output


def _fake_dreambench(root: Path) -> Path:
    """A DreamBench-shaped folder whose prompts use the tiny text encoder's (world) words."""
    rng = np.random.default_rng(0)
    for subject in ("ball_a", "box_b"):
        (root / "dataset" / subject).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "dataset" / subject / f"0{i}.jpg")
    pair = ["./dreambooth/dataset/ball_a/00.jpg", "./dreambooth/dataset/box_b/01.jpg"]
    items = [{"prompt": "a ball on the left and a box on the right on grass", "image_paths": pair},
             {"prompt": "a ball on the left and a box on the right in the snow", "image_paths": pair},
             {"prompt": "a box on sand", "image_paths": pair[1:]}]
    (root / "uno_dreambench_multiip.json").write_text(json.dumps(items[:2]))
    (root / "uno_dreambench_singleip.json").write_text(json.dumps(items[2:]))
    return root


def test_generate_dreambench_with_the_tiny_backbone(base_ckpt, tmp_path):
    from focusdpo.eval.dreambench import index_generated
    from focusdpo.eval.dreambench_data import load_entries
    from focusdpo.eval.generate import generate_dreambench, load_reference

    data = _fake_dreambench(tmp_path / "db")
    ref = load_reference(data / "dataset" / "ball_a" / "00.jpg", 40)  # 30x40 -> 30x40 -> cropped to 16x32
    assert ref.shape == (1, 3, 32, 16) and 0.0 <= ref.min() and ref.max() <= 1.0
    cfg = _cfg(base_ckpt, "eval.dreambench_size=32", "eval.dreambench_ref_size=16", "eval.dreambench_images=2")
    out = tmp_path / "gen"
    paths = generate_dreambench(cfg, "dreambench-multi", data, out, limit=1)
    assert [p.name for p in paths] == ["000_ball_a+box_b_3407.png", "000_ball_a+box_b_3408.png"]
    with Image.open(paths[0]) as im:
        assert im.size == (32, 32)
    assert not np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))  # seeds differ
    mtime = paths[0].stat().st_mtime_ns
    paths = generate_dreambench(cfg, "dreambench-multi", data, out)  # resumes: existing files are kept
    assert paths[0].stat().st_mtime_ns == mtime and len(paths) == 4
    got = index_generated(out, load_entries(data, "dreambench-multi"))
    assert [(g.entry.index, g.sample) for g in got] == [(0, 3407), (0, 3408), (1, 3407), (1, 3408)]
    assert json.loads((out / "generate.json").read_text())["images"] == 4
    with pytest.raises(ValueError, match="--limit 0"):
        generate_dreambench(cfg, "dreambench-single", data, out, limit=0)
