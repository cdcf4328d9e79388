"""The base checkpoint shipped in the package loads through the default config and samples."""

from __future__ import annotations

import numpy as np
import torch

from focusdpo.backbones import load_backbone, shipped_base_path
from focusdpo.backbones.flux import ARCH_FIELDS, read_tiny_metadata
from focusdpo.config import ModelConfig, SampleConfig, WorldConfig, load_config
from focusdpo.sampling import generate, world_inputs
from focusdpo.world import World


def test_shipped_base_matches_the_default_config_and_world():
    path = shipped_base_path()
    assert path.is_file() and path.stat().st_size <= 20 * 2**20
    arch, vocabulary = read_tiny_metadata(path)
    assert arch == {f: getattr(ModelConfig(), f) for f in ARCH_FIELDS}
    assert vocabulary == World(WorldConfig()).vocabulary()
    run_cfg = load_config(path.parent / "config.yaml")
    assert all(getattr(run_cfg.model, f) == arch[f] for f in ARCH_FIELDS)
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
