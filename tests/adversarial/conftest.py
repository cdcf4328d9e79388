"""Fixtures of the adversarial tests: the trainer tests' tiny base and toy DIP set (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

for _helpers in ("train", "data"):  # train_fixtures (tiny overrides), dip_fixtures (synthetic scenes)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / _helpers))

from train_fixtures import tiny_overrides  # noqa: E402

from focusdpo.config import load_config  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on 2 shared cores oversubscribed BLAS threads are ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(root, base)``: a folder holding the cached tiny toy DIP set, and a random tiny base checkpoint."""
    from focusdpo.backbones.flux import build_tiny, save_tiny
    from focusdpo.data import ensure_toy_dip
    from focusdpo.world import World

    root = tmp_path_factory.mktemp("adversarial_env")
    cfg = load_config(None, tiny_overrides(root, root / "base.safetensors"))
    torch.manual_seed(0)
    backbone = build_tiny(cfg.model, World(cfg.world).vocabulary())
    save_tiny(backbone, root / "base.safetensors", cfg.model)
    ensure_toy_dip(cfg)
    return root, root / "base.safetensors"
