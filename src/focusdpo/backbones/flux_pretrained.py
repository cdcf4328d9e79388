"""The full FLUX.1 loader (``model.backbone: flux``): a diffusers FLUX folder or hub id -> ``FluxInContext``.

A diffusers FLUX folder (``black-forest-labs/FLUX.1-dev`` layout) holds ``transformer/``, ``vae/``,
``text_encoder/`` + ``tokenizer/`` (CLIP-L), ``text_encoder_2/`` + ``tokenizer_2/`` (T5-XXL) and
``scheduler/``. :func:`load_flux_pretrained` loads the transformer, merges an optional UNO LoRA into it
(``model.flux.lora_import``), wraps the VAE as the codec (optionally behind an on-disk latent cache) and T5 + CLIP as
the text encoder, and hands the three to the same adapter class the tiny model uses. Weights load through
safetensors only; no remote code.

The tests build a folder of the same layout at a tiny size (``tests/flux_tiny.py``) and load it through the
very code a user's run takes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from focusdpo.backbones.flux import FluxInContext
from focusdpo.backbones.flux_text import FluxTextEncoder, TextCache
from focusdpo.backbones.uno import load_uno_lora_file, merge_uno_lora
from focusdpo.backbones.vae import FluxVAECodec, LatentCache, cache_dataset_latents
from focusdpo.config import ModelConfig
from focusdpo.quantization import quantize_frozen

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_flux_pretrained(cfg: ModelConfig, device: torch.device | str | None = None) -> FluxInContext:
    """Load FLUX from ``cfg.checkpoint`` (diffusers folder or hub id) onto ``device`` (default CPU), frozen.

    ``cfg.patch`` must equal the VAE token size (16 for FLUX); ``cfg.dtype`` sets the weight dtype of all
    parts. From the section ``model.flux``: ``lora_import`` merges UNO's ``dit_lora``; ``offload_encoders``
    keeps the VAE and text encoders on the CPU between calls; ``latent_cache`` caches VAE latents by image
    content and text features by prompt on disk; ``guidance`` feeds the guidance embedding of
    guidance-distilled models (FLUX.1-dev).
    """
    from diffusers import FluxTransformer2DModel

    if not cfg.checkpoint:
        raise ValueError("model.checkpoint is required for model.backbone=flux: a local diffusers FLUX folder "
                         "(with transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/) or a hub id")
    opts = cfg.options  # model.flux (FluxOptions)
    device = torch.device(device or "cpu")
    dtype = DTYPES[cfg.dtype]
    transformer = FluxTransformer2DModel.from_pretrained(cfg.checkpoint, subfolder="transformer", torch_dtype=dtype,
                                                         use_safetensors=True)
    if opts.lora_import:
        n = merge_uno_lora(transformer, load_uno_lora_file(opts.lora_import))
        log.info("merged the UNO LoRA %s into %d layers", opts.lora_import, n)
    transformer.requires_grad_(False).eval()
    quantize_frozen(transformer, cfg.quantization)  # on the CPU, before the move: the device never holds bf16
    transformer.to(device)
    codec = FluxVAECodec.from_pretrained(cfg.checkpoint, dtype=dtype, device=device, offload=opts.offload_encoders)
    if cfg.patch != codec.patch:  # DIP builds compute M_d at model.patch: it must be the VAE token size
        raise ValueError(f"model.patch={cfg.patch} but the VAE of {cfg.checkpoint} makes {codec.patch}-pixel tokens "
                         f"(downsampling {codec.vae_scale} x 2x2 packing): set model.patch={codec.patch}")
    if opts.latent_cache:
        codec = LatentCache(codec, opts.latent_cache)
    text = FluxTextEncoder.from_pretrained(cfg.checkpoint, max_tokens=cfg.max_text_tokens, dtype=dtype,
                                           device=device, offload=opts.offload_encoders)
    if opts.latent_cache:
        text = TextCache(text, opts.latent_cache)
    if transformer.config.guidance_embeds and opts.guidance is None:
        raise ValueError(f"{cfg.checkpoint} is guidance-distilled (FLUX.1-dev): set model.flux.guidance "
                         f"(UNO uses 4.0, the FLUX pipeline 3.5)")
    if not transformer.config.guidance_embeds and opts.guidance is not None:
        raise ValueError(f"model.flux.guidance={opts.guidance} but {cfg.checkpoint} has no guidance embedding "
                         f"(e.g. FLUX.1-schnell): set model.flux.guidance=null")
    return FluxInContext(transformer, codec, text, guidance=opts.guidance)


def cache_latents(cfg, open_dataset: Callable[[str], Sequence], device: torch.device | str = "cpu",
                  batch_size: int = 8, progress=None) -> dict[str, tuple[int, int]]:
    """The body of ``focusdpo cache-latents``: fill ``model.<backbone>.latent_cache`` with the VAE latents of every
    image and the text features (FLUX.1: T5 + CLIP; FLUX.2: Qwen3) of every prompt of the DIP set
    ``cfg.data.path`` (loads no transformer).

    ``open_dataset(cfg.data.path)`` gives the DIP set (the CLI passes ``DipDataset``: backbones do not import
    ``focusdpo.data``). Returns ``{"images": (already cached, encoded now), "prompts": (already cached, encoded
    now)}``, prompts counted once each.
    """
    m = cfg.model
    cache = getattr(m.options, "latent_cache", None)
    if m.backbone not in ("flux", "flux2") or not cache or not m.checkpoint:
        raise ValueError(f"cache-latents needs model.backbone=flux or flux2 with model.checkpoint and "
                         f"model.<backbone>.latent_cache set (got {m.backbone!r}, {m.checkpoint!r}, {cache!r})")
    if not cfg.data.path:
        raise ValueError("cache-latents needs data.path: the DIP set whose images to encode (focusdpo dip build)")
    codec_cls, text_cls = FluxVAECodec, FluxTextEncoder
    if m.backbone == "flux2":
        from focusdpo.backbones.flux2_text import Flux2TextEncoder
        from focusdpo.backbones.flux2_vae import Flux2VAECodec

        codec_cls, text_cls = Flux2VAECodec, Flux2TextEncoder
    codec = codec_cls.from_pretrained(m.checkpoint, dtype=DTYPES[m.dtype], device=device)
    prompts: list[str] = []
    images = cache_dataset_latents(LatentCache(codec, cache), open_dataset(cfg.data.path), batch_size,
                                   progress, prompts)
    text = TextCache(text_cls.from_pretrained(m.checkpoint, max_tokens=m.max_text_tokens, dtype=DTYPES[m.dtype],
                                              device=device), cache)
    unique = list(dict.fromkeys(prompts))
    for i in range(0, len(unique), batch_size):
        text.encode(unique[i: i + batch_size])
    return {"images": images, "prompts": (text.hits, text.misses)}
