"""Helpers of the trainer tests: tiny config overrides (16 px scenes, 2+1 blocks, head dim 16), so a
training step takes milliseconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from focusdpo.config import Config, load_config

TINY_MODEL = ["model.flux-tiny.num_layers=2", "model.flux-tiny.num_single_layers=1", "model.flux-tiny.num_heads=2", "model.flux-tiny.head_dim=16",
              "model.flux-tiny.text_dim=32", "model.max_text_tokens=24"]
TINY_WORLD = ["world.scene_size=16", "world.ref_size=8", "world.n_identities=40", "world.max_subjects=2"]


def tiny_overrides(root: Path, base: Path, **extra: object) -> list[str]:
    """Overrides of the toy config for a tiny run under ``root`` (data cache shared through ``root``)."""
    out = TINY_MODEL + TINY_WORLD + [
        f"model.checkpoint={base}", f"data.cache_dir={root / 'cache'}", "data.n_records=16", "data.batch_size=2",
        "train.max_steps=3", "train.warmup_steps=0", "train.checkpoint_every=0", "train.lr=0.001",
        "loss.lambda_sft=0.0", "sample.steps=2", "train.val_records=2", f"train.output_dir={root / 'run'}",
    ]
    out += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return out


def tiny_config(root: Path, base: Path, **extra: object) -> Config:
    return load_config(None, tiny_overrides(root, base, **extra))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread inside these tests: on 2 shared cores oversubscribed BLAS threads are ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(root, base)``: a folder holding the cached toy DIP set, and a random tiny base checkpoint file.

    Used through the conftests that import it (trainer and adversarial tests), built once per session each.
    """
    from focusdpo.backbones.flux import build_tiny, save_tiny
    from focusdpo.data import ensure_toy_dip
    from focusdpo.world import World

    root = tmp_path_factory.mktemp("tiny_env")
    cfg = load_config(None, tiny_overrides(root, root / "base.safetensors"))
    torch.manual_seed(0)
    backbone = build_tiny(cfg.model, World(cfg.world).vocabulary())
    save_tiny(backbone, root / "base.safetensors", cfg.model)
    ensure_toy_dip(cfg)
    return root, root / "base.safetensors"
