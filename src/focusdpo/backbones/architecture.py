"""The configured backbone's architecture on the ``meta`` device, for the dry-run memory budget (issue 17).

:func:`meta_architecture` builds the transformer at random init on ``meta`` (no memory, no download) and counts the
text encoders and VAE it would hold, from the checkpoint folder's own ``config.json`` files, or, for a FLUX.1 hub
id that is not a local folder, from FLUX.1-dev's published architecture. ``focusdpo.train.budget`` prices it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from focusdpo.config import ConfigError, ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# FLUX.1-dev's published architecture (black-forest-labs/FLUX.1-dev, the diffusers folder's config.json files), used
# when model.checkpoint is a hub id and not a local folder.
FLUX1_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
             "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
             "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX1_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
             "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
             "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "use_quant_conv": False,
             "use_post_quant_conv": False}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768, "vocab_size": 49408}


@dataclass
class MetaArchitecture:
    """``transformer`` on meta; ``encoders``: name -> device bytes at ``model.dtype``; ``native_size``: the target
    side a run of this backbone trains at by default (None: the built-in world's sizes); ``gpu``: a model that trains
    on GPUs (``train.mixed_precision=auto`` is bf16 there)."""

    transformer: nn.Module
    encoders: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    native_size: int | None = None
    gpu: bool = False


def meta_architecture(cfg: ModelConfig) -> MetaArchitecture:
    """The :class:`MetaArchitecture` of ``cfg`` (flux-tiny, flux, flux2)."""
    if cfg.backbone == "flux-tiny":
        return MetaArchitecture(_tiny(cfg), {}, ["flux-tiny: pixel codec (no VAE); the tiny text encoder is not "
                                                 "counted"])
    if cfg.backbone not in ("flux", "flux2"):
        raise ConfigError(f"model.backbone={cfg.backbone!r}: the dry-run budget knows flux-tiny, flux and flux2")
    folder = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else None
    dtype_bytes = DTYPE_BYTES[cfg.dtype]
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        return _local(folder, dtype_bytes)
    if cfg.backbone == "flux2":
        raise ConfigError(f"model.checkpoint={cfg.checkpoint!r}: the flux2 dry-run reads the architecture from a local "
                          f"diffusers folder (transformer/config.json); download it first")
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    encoders = {"T5-XXL": device_bytes(_meta(T5EncoderModel, {"config": T5Config(**T5_XXL)}), dtype_bytes),
                "CLIP-L": device_bytes(_meta(CLIPTextModel, {"config": CLIPTextConfig(**CLIP_L)}), dtype_bytes),
                "VAE": device_bytes(_meta(AutoencoderKL, FLUX1_VAE), dtype_bytes)}
    notes = [f"architecture: FLUX.1-dev's published configs ({cfg.checkpoint or 'no checkpoint'} is not a local "
             f"folder)"]
    return MetaArchitecture(_meta(FluxTransformer2DModel, FLUX1_DEV), encoders, notes, 512, True)


def _meta(cls: type, config: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return cls(**config)


def device_bytes(module: nn.Module, dtype_bytes: int) -> int:
    """Parameters and floating buffers at ``dtype_bytes``, other buffers (ids) at their own size."""
    buffers = sum(b.numel() * (dtype_bytes if b.is_floating_point() else b.element_size()) for b in module.buffers())
    return sum(p.numel() for p in module.parameters()) * dtype_bytes + buffers


def _tiny(cfg: ModelConfig) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    from focusdpo.backbones.flux import rope_axes

    a = cfg.options  # model.flux-tiny
    return _meta(FluxTransformer2DModel, dict(
        patch_size=1, in_channels=3 * cfg.patch * cfg.patch, num_layers=a.num_layers,
        num_single_layers=a.num_single_layers, attention_head_dim=a.head_dim, num_attention_heads=a.num_heads,
        joint_attention_dim=a.text_dim, pooled_projection_dim=a.text_dim, guidance_embeds=False,
        axes_dims_rope=rope_axes(a.head_dim)))


def _local(folder: Path, dtype_bytes: int) -> MetaArchitecture:
    """The transformer, text encoders and VAE of a local diffusers folder, from their ``config.json`` on meta."""
    import diffusers
    import transformers

    def build(lib: Any, sub: str) -> nn.Module:
        data = json.loads((folder / sub / "config.json").read_text())
        with torch.device("meta"):
            if lib is diffusers:
                return getattr(diffusers, data["_class_name"]).from_config(data)
            cls = getattr(transformers, data["architectures"][0])
            return cls(cls.config_class.from_dict(data))

    encoders = {"VAE": device_bytes(build(diffusers, "vae"), dtype_bytes)}
    for sub in ("text_encoder", "text_encoder_2"):
        if (folder / sub / "config.json").is_file():
            encoders[sub] = device_bytes(build(transformers, sub), dtype_bytes)
    return MetaArchitecture(build(diffusers, "transformer"), encoders, [f"architecture: the config.json files of "
                                                                        f"{folder}"], 512, True)
