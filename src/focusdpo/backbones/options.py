"""Each built-in backbone's own config section (``model.<backbone>``), as a dataclass the registry names.

``model.*`` holds what every backbone reads (``backbone``, ``checkpoint``, ``dtype``, ``patch``,
``max_text_tokens``); everything else lives under the section of the backbone it belongs to::

    model:
      backbone: flux
      checkpoint: models/FLUX.1-dev
      flux:
        guidance: 4.0
        lora_import: models/UNO/dit_lora.safetensors

A section of another backbone, or a field that belongs to one, is refused with a message naming the owner
(:func:`focusdpo.config.ModelConfig`). This module imports no torch, so reading a config stays cheap; a backbone
added outside the package passes its own dataclass to ``register_backbone(..., options=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from focusdpo.config import _check, _f


@dataclass
class NoOptions:
    """The section of a backbone without options of its own."""


@dataclass
class FluxTinyOptions:
    """``model.flux-tiny``: the architecture of the built-in tiny FLUX (a checkpoint must match it)."""

    num_layers: int = _f(3, "Double-stream blocks.")
    num_single_layers: int = _f(4, "Single-stream blocks.")
    num_heads: int = _f(4, "Attention heads.")
    head_dim: int = _f(32, "Dimension per head (even, >= 8: RoPE).")
    text_dim: int = _f(64, "Text-encoder width.")

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "text_dim"):
            _check(getattr(self, name) >= 1, f"model.flux-tiny.{name}", getattr(self, name), ">= 1")
        _check(self.num_single_layers >= 0, "model.flux-tiny.num_single_layers", self.num_single_layers, ">= 0")


@dataclass
class DiffusersFluxOptions:
    """Options of a FLUX-class model loaded from a diffusers folder or hub id (``flux``, ``flux2``)."""

    guidance: float | None = _f(None, "Guidance-embedding value of guidance-distilled models (FLUX.1-dev: UNO samples "
                                      "with 4.0; FLUX.2 [dev]); null for models without one (FLUX.1-schnell, FLUX.2 "
                                      "[klein]).")
    offload_encoders: bool = _f(False, "Keep the frozen VAE and text encoder(s) on the CPU, moved to the device only "
                                       "while they encode (saves accelerator memory, costs transfers).")
    latent_cache: str | None = _f(None, "Folder caching VAE latents by image content and text features by prompt "
                                        "(e.g. <dataset>/latents; fill it with `focusdpo cache-latents`); null: "
                                        "encode every time.")

    def __post_init__(self) -> None:
        if self.guidance is not None:
            _check(self.guidance >= 0, "model.<backbone>.guidance", self.guidance, ">= 0 or null")


@dataclass
class FluxOptions(DiffusersFluxOptions):
    """``model.flux``: FLUX.1 (UNO-style reference tokens)."""

    lora_import: str | None = _f(None, "A UNO-style LoRA (safetensors, UNO's dit_lora) merged into the base on load; "
                                       "it is also the DPO reference.")


@dataclass
class Flux2Options(DiffusersFluxOptions):
    """``model.flux2``: FLUX.2 [klein] (native multi-reference)."""
