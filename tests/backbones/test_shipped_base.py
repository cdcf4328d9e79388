"""The base checkpoint shipped in the package loads through the default config and samples."""

from __future__ import annotations

import numpy as np
import torch

from focusdpo.backbones import load_backbone, shipped_base_path
from focusdpo.backbones.flux import read_tiny_metadata, tiny_arch
from focusdpo.config import ModelConfig, SampleConfig, WorldConfig, load_config
from focusdpo.sampling import generate, world_inputs
from focusdpo.world import World


def test_shipped_base_matches_the_default_config_and_world():
    path = shipped_base_path()
    assert path.is_file() and path.stat().st_size <= 20 * 2**20
    arch, vocabulary = read_tiny_metadata(path)
    assert arch == tiny_arch(ModelConfig())
    assert vocabulary == World(WorldConfig()).vocabulary()
    run_cfg = load_config(path.parent / "config.yaml")
    assert tiny_arch(run_cfg.model) == arch
    assert (path.parent / "README.md").read_text().count("focusdpo pretrain") >= 1


def test_shipped_base_loads_and_samples_a_world_scene():
    torch.set_num_threads(2)
    backbone = load_backbone(ModelConfig())
    world = World(WorldConfig())
    prompts, refs, _ = world_inputs(world, 2, 2, "heldout", seed=0)
    images = generate(backbone, prompts, refs, (32, 32), SampleConfig(steps=4), seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    again = generate(backbone, prompts, refs, (32, 32), SampleConfig(steps=4), seed=0)
    assert torch.equal(images, again)
    assert np.isfinite(images.numpy()).all()


def test_shipped_base_draws_held_out_subjects_and_still_leaks():
    """The shipped base under the default config's sampler, on held-out identities (ISSUE 4 point 5): the body
    colour and silhouette come from the right reference well above chance (class 1/6, body 1/9), and in
    2-subject scenes some subjects still carry another subject's attributes (the failure FocusDPO targets)."""
    from focusdpo.eval.toy import heldout_scenes, score_method

    torch.set_num_threads(2)
    cfg = load_config(None, ["eval.n_scenes=12", "eval.seeds=[0]", "eval.subject_counts=[2]"])
    world = World(cfg.world)
    scenes = heldout_scenes(world, cfg.eval.n_scenes, cfg.eval.subject_counts)
    scores, _ = score_method(load_backbone(cfg.model), world, scenes, cfg)
    subjects = [s for r in scores[2][0] for s in r["subjects"]]
    body = np.mean([s["fidelity"]["body"] for s in subjects])
    cls = np.mean([s["fidelity"]["class"] for s in subjects])
    leaked = np.mean([s["leaked"] for s in subjects])
    assert body >= 0.85 and cls >= 0.35  # measured: 1.00 and 0.54 (the 11,000-step base unguided: 0.17)
    assert leaked > 0.05
