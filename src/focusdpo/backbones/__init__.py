"""Backbones behind one contract (:mod:`focusdpo.backbones.base`); :func:`load_backbone` picks one by config.

``flux-tiny``: the built-in in-context FLUX at a tiny size (pixel codec, small text encoder), loaded from the
base shipped in ``focusdpo/assets/base`` or a ``focusdpo pretrain`` output. ``flux``: a full FLUX.1 model
through ``focusdpo.backbones.flux_pretrained`` (VAE codec, T5 + CLIP text encoders). ``flux2``: FLUX.2 [klein]
through ``focusdpo.backbones.flux2`` (FLUX.2 VAE, Qwen3 text encoder, native multi-reference sequence).
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib import resources
from pathlib import Path

import torch

from focusdpo.backbones.base import Backbone, Codec, FocusTap, TextCond, TextEncoder, Tokens
from focusdpo.config import ModelConfig

__all__ = ["Backbone", "Codec", "FocusTap", "TextCond", "TextEncoder", "Tokens", "load_backbone", "shipped_base_path",
           "tiny_checkpoint_file"]

CHECKPOINT_FILE = "model.safetensors"


def shipped_base_path() -> Path:
    """The base checkpoint file shipped inside the package (``focusdpo/assets/base/model.safetensors``)."""
    return Path(str(resources.files("focusdpo").joinpath("assets", "base", CHECKPOINT_FILE)))


def tiny_checkpoint_file(checkpoint: str | None) -> Path:
    """``model.checkpoint`` -> the tiny checkpoint file: None = the shipped base; a folder = its model file."""
    path = shipped_base_path() if checkpoint is None else Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        hint = ("the package ships no base: rebuild it with the command in focusdpo/assets/base/README.md"
                if checkpoint is None else "pass a folder written by `focusdpo pretrain` or its model.safetensors")
        raise FileNotFoundError(f"model.checkpoint: {path} not found: {hint}")
    return path


def load_backbone(cfg: ModelConfig, device: torch.device | str | None = None) -> Backbone:
    """Build the backbone named by ``cfg.backbone`` with frozen base weights on ``device`` (default CPU)."""
    if cfg.backbone == "flux-tiny":
        from focusdpo.backbones.flux import load_tiny

        return load_tiny(tiny_checkpoint_file(cfg.checkpoint), cfg, device)
    if cfg.backbone == "flux":
        if importlib.util.find_spec("focusdpo.backbones.flux_pretrained") is None:
            raise NotImplementedError("model.backbone=flux needs focusdpo.backbones.flux_pretrained (the full "
                                      "FLUX.1 loader), which this installation does not include")
        module = importlib.import_module("focusdpo.backbones.flux_pretrained")
        return module.load_flux_pretrained(cfg, device)
    if cfg.backbone == "flux2":
        from focusdpo.backbones.flux2 import load_flux2

        return load_flux2(cfg, device)
    raise ValueError(f"model.backbone={cfg.backbone!r} is invalid: allowed flux-tiny, flux, flux2")
