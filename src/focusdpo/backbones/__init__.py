"""Backbones behind one contract (:mod:`focusdpo.backbones.base`); :func:`load_backbone` picks one by config.

``flux-tiny``: the built-in in-context FLUX at a tiny size (pixel codec, small text encoder), loaded from the
base shipped in ``focusdpo/assets/base`` or a ``focusdpo pretrain`` output. ``flux``: a full FLUX.1 model
through ``focusdpo.backbones.flux_pretrained`` (VAE codec, T5 + CLIP text encoders). ``flux2``: FLUX.2 [klein]
through ``focusdpo.backbones.flux2`` (FLUX.2 VAE, Qwen3 text encoder, native multi-reference sequence).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from focusdpo.backbones.base import Backbone, Codec, FocusTap, TextCond, TextEncoder, Tokens
from focusdpo.backbones.options import Flux2Options, FluxOptions, FluxTinyOptions, NoOptions
from focusdpo.config import ModelConfig
from focusdpo.plugins import load_plugins

__all__ = ["Backbone", "BackboneSpec", "Codec", "FocusTap", "TextCond", "TextEncoder", "Tokens", "backbone_names",
           "backbone_spec", "load_backbone", "register_backbone", "shipped_base_path", "tiny_checkpoint_file"]

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


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    Args:
        name: the ``model.backbone`` value (also the name of its config section, ``model.<name>``).
        loader: ``loader(cfg.model, device) -> Backbone``; its module is imported only when it is chosen.
        options: the dataclass of its config section (``cfg.model.options``); a dataclass without fields when it
            has none.
        prediction: what its diffusion convention regresses (``backbone.diffusion.prediction``); the trainer
            checks ``loss.prediction`` against it before loading anything.
        summary: one line for ``focusdpo config --backbones``.
    """

    name: str
    loader: Loader
    options: type = NoOptions
    prediction: str = "flow"
    summary: str = ""


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


# name -> spec: the one line a new backbone adds (its module is imported only when it is chosen)
_BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("flux-tiny", _load_flux_tiny, FluxTinyOptions, summary="the built-in tiny FLUX (CPU, no download)"),
    BackboneSpec("flux", _load_flux, FluxOptions, summary="FLUX.1 from a diffusers folder or hub id, UNO-style "
                                                          "reference tokens"),
    BackboneSpec("flux2", _load_flux2, Flux2Options, summary="FLUX.2 [klein] from a diffusers folder or hub id, "
                                                             "native multi-reference"),
)}


def register_backbone(name: str, loader: Loader, options: type | None = None, prediction: str = "flow",
                      summary: str = "", replace: bool = False) -> BackboneSpec:
    """Make ``model.backbone=name`` load with ``loader(cfg.model, device) -> Backbone``; ``options`` is the
    dataclass of its section ``model.<name>`` (None: no fields)."""
    if name in _BACKBONES and not replace:
        raise ValueError(f"backbone {name!r} is already registered; pass replace=True to override it")
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"register_backbone({name!r}): options must be a dataclass type, got {options!r}")
    spec = BackboneSpec(name, loader, options or NoOptions, prediction, summary)
    _BACKBONES[name] = spec
    return spec


def backbone_names() -> tuple[str, ...]:
    """The names ``model.backbone`` accepts (built-ins first, then plug-ins: :mod:`focusdpo.plugins`)."""
    load_plugins()
    return tuple(_BACKBONES)


def backbone_spec(name: str) -> BackboneSpec:
    """The registered :class:`BackboneSpec` of ``name`` (ValueError listing the names when there is none)."""
    load_plugins()
    if name not in _BACKBONES:
        raise ValueError(f"model.backbone={name!r} is invalid: allowed {', '.join(_BACKBONES)}")
    return _BACKBONES[name]


def load_backbone(cfg: ModelConfig, device: torch.device | str | None = None) -> Backbone:
    """Build the backbone named by ``cfg.backbone`` with frozen base weights on ``device`` (default CPU)."""
    from focusdpo.quantization import check_quantization, quantization_of, quantize_frozen

    spec = backbone_spec(cfg.backbone)
    check_quantization(cfg.quantization, device)  # before any weight is read
    backbone = spec.loader(cfg, device)
    if cfg.quantization != "none" and quantization_of(backbone.trainable()) == "none":
        quantize_frozen(backbone.trainable(), cfg.quantization)  # a registered loader that does not quantise
    return backbone
