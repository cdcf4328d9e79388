"""A run folder (written by ``focusdpo train``) -> its resolved config, its LoRA or its newest checkpoint.

Used by both ``focusdpo.train`` and ``focusdpo.eval``, which do not import each other. A run folder holds
``config.yaml`` (the resolved config), ``checkpoints/step-XXXXXXXX/`` while it trains and, at the end,
``lora.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from focusdpo.config import Config

if TYPE_CHECKING:
    from focusdpo.backbones import Backbone

PREFIX = "step-"


class MethodError(ValueError):
    """A run folder cannot be evaluated; the message names the folder and the fix."""


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a run saved (``run_dir/config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise MethodError(f"--run {run_dir}: no config.yaml; pass a folder written by `focusdpo train`")
    return Config.from_yaml(path.read_text())


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``<run>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first (temp folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
            found.append((int(path.name[len(PREFIX):]), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None when the run has none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_method(cfg: Config, run_dir: str | Path | None, device: torch.device | str | None = None,
                check_world: bool = True, allow_checkpoint: bool = False) -> Backbone:
    """The base backbone of ``cfg.model`` (``run_dir`` None), or the run's backbone with its final LoRA loaded.

    With ``check_world`` (the toy benchmark) a run must have been trained on the world ``cfg`` evaluates (same
    held-out identities), else :class:`MethodError` names the differing fields. ``allow_checkpoint``: an
    unfinished run gives the LoRA of its newest checkpoint (focus maps during training) instead of an error.
    """
    from focusdpo.backbones import load_backbone
    from focusdpo.lora import load_lora

    if run_dir is None:
        return load_backbone(cfg.model, device)
    run_cfg = run_config(run_dir)
    if check_world and run_cfg.world != cfg.world:
        diff = {k: (getattr(run_cfg.world, k), getattr(cfg.world, k)) for k in vars(cfg.world)
                if getattr(run_cfg.world, k) != getattr(cfg.world, k)}
        raise MethodError(f"--run {run_dir} was trained on another world {diff} (run, eval config): evaluate it "
                          f"with --config {Path(run_dir) / 'config.yaml'} or matching world.* overrides")
    lora_file = Path(run_dir) / "lora.safetensors"
    if not lora_file.is_file() and allow_checkpoint:
        latest = latest_checkpoint(run_dir)
        lora_file = lora_file if latest is None else latest / "lora.safetensors"
    if not lora_file.is_file():
        raise MethodError(f"--run {run_dir}: no lora.safetensors (the run has not finished); finish it with "
                          f"`focusdpo train --resume` or evaluate a finished run")
    backbone = load_backbone(run_cfg.model, device)
    backbone.add_lora(run_cfg.lora)
    backbone.load_lora_state_dict(load_lora(lora_file))
    return backbone
