"""Backbones behind one contract (:mod:`focusdpo.backbones.base`); :func:`load_backbone` picks one by config.

``flux-tiny``: the built-in in-context FLUX at a tiny size (pixel codec, small text encoder), loaded from the
base shipped in ``focusdpo/assets/base`` or a ``focusdpo pretrain`` output. ``flux``: a full FLUX.1 model
through ``focusdpo.backbones.flux_pretrained`` (VAE codec, T5 + CLIP text encoders). ``flux2``: FLUX.2 [klein]
through ``focusdpo.backbones.flux2`` (FLUX.2 VAE, Qwen3 text encoder, native multi-reference sequence).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from focusdpo.backbones.base import Backbone, Codec, FocusTap, TextCond, TextEncoder, Tokens
from focusdpo.config import ModelConfig

__all__ = ["Backbone", "Codec", "FocusTap", "TextCond", "TextEncoder", "Tokens", "backbone_names", "load_backbone",
           "register_backbone", "shipped_base_path", "tiny_checkpoint_file"]

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


Loader = Callable[[ModelConfig, "torch.device | str | None"], Backbone]


def _load_flux_tiny(cfg: ModelConfig, device: torch.device | str | None) -> Backbone:
    from focusdpo.backbones.flux import load_tiny

    return load_tiny(tiny_checkpoint_file(cfg.checkpoint), cfg, device)


def _load_flux(cfg: ModelConfig, device: torch.device | str | None) -> Backbone:
    if importlib.util.find_spec("focusdpo.backbones.flux_pretrained") is None:
        raise NotImplementedError("model.backbone=flux needs focusdpo.backbones.flux_pretrained (the full "
                                  "FLUX.1 loader), which this installation does not include")
    module = importlib.import_module("focusdpo.backbones.flux_pretrained")
    return module.load_flux_pretrained(cfg, device)


def _load_flux2(cfg: ModelConfig, device: torch.device | str | None) -> Backbone:
    from focusdpo.backbones.flux2 import load_flux2

    return load_flux2(cfg, device)


# name -> loader: the one line a new backbone adds (its module is imported only when it is chosen)
_LOADERS: dict[str, Loader] = {"flux-tiny": _load_flux_tiny, "flux": _load_flux, "flux2": _load_flux2}


def register_backbone(name: str, loader: Loader, replace: bool = False) -> None:
    """Make ``model.backbone=name`` load with ``loader(cfg.model, device) -> Backbone``."""
    if name in _LOADERS and not replace:
        raise ValueError(f"backbone {name!r} is already registered; pass replace=True to override it")
    _LOADERS[name] = loader


def backbone_names() -> tuple[str, ...]:
    """The names ``model.backbone`` accepts."""
    return tuple(_LOADERS)


def load_backbone(cfg: ModelConfig, device: torch.device | str | None = None) -> Backbone:
    """Build the backbone named by ``cfg.backbone`` with frozen base weights on ``device`` (default CPU)."""
    from focusdpo.quantization import check_quantization, quantization_of, quantize_frozen

    if cfg.backbone not in _LOADERS:
        raise ValueError(f"model.backbone={cfg.backbone!r} is invalid: allowed {', '.join(_LOADERS)}")
    check_quantization(cfg.quantization, device)  # before any weight is read
    backbone = _LOADERS[cfg.backbone](cfg, device)
    if cfg.quantization != "none" and quantization_of(backbone.trainable()) == "none":
        quantize_frozen(backbone.trainable(), cfg.quantization)  # a registered loader that does not quantise
    return backbone
