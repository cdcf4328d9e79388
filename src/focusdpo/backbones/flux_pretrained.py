"""The full FLUX.1 loader (``model.backbone: flux``): a diffusers FLUX folder or hub id -> ``FluxInContext``.

A diffusers FLUX folder (``black-forest-labs/FLUX.1-dev`` layout) holds ``transformer/``, ``vae/``,
``text_encoder/`` + ``tokenizer/`` (CLIP-L), ``text_encoder_2/`` + ``tokenizer_2/`` (T5-XXL) and
``scheduler/``. :func:`load_flux_pretrained` loads the transformer, merges an optional UNO LoRA into it
(``model.lora_import``), wraps the VAE as the codec (optionally behind an on-disk latent cache) and T5 + CLIP as
the text encoder, and hands the three to the same adapter class the tiny model uses. Weights load through
safetensors only; no remote code.

:func:`write_tiny_flux_folder` writes a folder of the same layout with every model at a tiny size and
locally built tokenizers (no download): tests and the CPU benchmark load it through the very code a user's
run takes.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from pathlib import Path

import torch

from focusdpo.backbones.flux import FluxInContext
from focusdpo.backbones.flux_text import FluxTextEncoder, TextCache
from focusdpo.backbones.uno import load_uno_lora_file, merge_uno_lora
from focusdpo.backbones.vae import FluxVAECodec, LatentCache, cache_dataset_latents
from focusdpo.config import ModelConfig

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_flux_pretrained(cfg: ModelConfig, device: torch.device | str | None = None) -> FluxInContext:
    """Load FLUX from ``cfg.checkpoint`` (diffusers folder or hub id) onto ``device`` (default CPU), frozen.

    ``cfg.patch`` must equal the VAE token size (16 for FLUX); ``cfg.dtype`` sets the weight dtype of all
    parts; ``cfg.lora_import`` merges UNO's ``dit_lora``; ``cfg.offload_encoders`` keeps the VAE and text
    encoders on the CPU between calls; ``cfg.latent_cache`` caches VAE latents by image content and text
    features by prompt on disk; ``cfg.guidance`` feeds the guidance embedding of guidance-distilled models
    (FLUX.1-dev).
    """
    from diffusers import FluxTransformer2DModel

    if not cfg.checkpoint:
        raise ValueError("model.checkpoint is required for model.backbone=flux: a local diffusers FLUX folder "
                         "(with transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/) or a hub id")
    device = torch.device(device or "cpu")
    dtype = DTYPES[cfg.dtype]
    transformer = FluxTransformer2DModel.from_pretrained(cfg.checkpoint, subfolder="transformer", torch_dtype=dtype,
                                                         use_safetensors=True)
    if cfg.lora_import:
        n = merge_uno_lora(transformer, load_uno_lora_file(cfg.lora_import))
        log.info("merged the UNO LoRA %s into %d layers", cfg.lora_import, n)
    transformer.requires_grad_(False).eval().to(device)
    codec = FluxVAECodec.from_pretrained(cfg.checkpoint, dtype=dtype, device=device, offload=cfg.offload_encoders)
    if cfg.patch != codec.patch:  # DIP builds compute M_d at model.patch: it must be the VAE token size
        raise ValueError(f"model.patch={cfg.patch} but the VAE of {cfg.checkpoint} makes {codec.patch}-pixel tokens "
                         f"(downsampling {codec.vae_scale} x 2x2 packing): set model.patch={codec.patch}")
    if cfg.latent_cache:
        codec = LatentCache(codec, cfg.latent_cache)
    text = FluxTextEncoder.from_pretrained(cfg.checkpoint, max_tokens=cfg.max_text_tokens, dtype=dtype,
                                           device=device, offload=cfg.offload_encoders)
    if cfg.latent_cache:
        text = TextCache(text, cfg.latent_cache)
    if transformer.config.guidance_embeds and cfg.guidance is None:
        raise ValueError(f"{cfg.checkpoint} is guidance-distilled (FLUX.1-dev): set model.guidance "
                         f"(UNO uses 4.0, the FLUX pipeline 3.5)")
    if not transformer.config.guidance_embeds and cfg.guidance is not None:
        raise ValueError(f"model.guidance={cfg.guidance} but {cfg.checkpoint} has no guidance embedding "
                         f"(e.g. FLUX.1-schnell): set model.guidance=null")
    return FluxInContext(transformer, codec, text, guidance=cfg.guidance)


# --- a tiny FLUX folder built locally (tests, CPU benchmark) ---------------------------------------------------

DEFAULT_WORDS = ("a", "an", "the", "photo", "of", "and", "with", "on", "in", "left", "right", "dog", "cat", "toy",
                 "red", "blue", "green", "yellow", "striped", "spotted", "grass", "table", "beach")


def _tiny_tokenizers(words: Sequence[str]):
    """A char-level CLIP BPE tokenizer and a T5 unigram tokenizer with whole-word pieces, built offline."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w.lower(), -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in chars]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    return clip_tok, t5_tok


def tiny_flux_components(words: Sequence[str] = DEFAULT_WORDS, seed: int = 0, guidance_embeds: bool = True,
                         width: int = 32, num_layers: int = 2, num_single_layers: int = 2) -> dict:
    """``FluxPipeline`` components at a tiny size (random weights from ``seed``), FLUX's real classes and
    latent layout: 16 latent channels, 8x VAE downsampling (16 px per packed token), T5 + CLIP text."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        clip_tok, t5_tok = _tiny_tokenizers(words)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=width))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=width, pooled_projection_dim=width,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": clip, "tokenizer": clip_tok,
            "text_encoder_2": t5, "tokenizer_2": t5_tok, "transformer": transformer}


def write_tiny_flux_folder(path: str | Path, **kwargs) -> Path:
    """Write :func:`tiny_flux_components` as a diffusers FLUX folder (``FluxPipeline.save_pretrained``)."""
    from diffusers import FluxPipeline

    path = Path(path)
    FluxPipeline(**tiny_flux_components(**kwargs)).save_pretrained(path, safe_serialization=True)
    return path


def cache_latents_command(cfg, device: torch.device | str = "cpu", batch_size: int = 8,
                          progress=None) -> dict[str, tuple[int, int]]:
    """``focusdpo cache-latents``: fill ``cfg.model.latent_cache`` with the VAE latents of every image and the
    text features (FLUX.1: T5 + CLIP; FLUX.2: Qwen3) of every prompt of the DIP set ``cfg.data.path`` (loads no
    transformer).

    Returns ``{"images": (already cached, encoded now), "prompts": (already cached, encoded now)}``, prompts
    counted once each.
    """
    from focusdpo.data.dataset import DipDataset

    m = cfg.model
    if m.backbone not in ("flux", "flux2") or not m.latent_cache or not m.checkpoint:
        raise ValueError(f"cache-latents needs model.backbone=flux or flux2 with model.checkpoint and "
                         f"model.latent_cache set (got {m.backbone!r}, {m.checkpoint!r}, {m.latent_cache!r})")
    if not cfg.data.path:
        raise ValueError("cache-latents needs data.path: the DIP set whose images to encode (focusdpo dip build)")
    codec_cls, text_cls = FluxVAECodec, FluxTextEncoder
    if m.backbone == "flux2":
        from focusdpo.backbones.flux2_text import Flux2TextEncoder
        from focusdpo.backbones.flux2_vae import Flux2VAECodec

        codec_cls, text_cls = Flux2VAECodec, Flux2TextEncoder
    codec = codec_cls.from_pretrained(m.checkpoint, dtype=DTYPES[m.dtype], device=device)
    prompts: list[str] = []
    images = cache_dataset_latents(LatentCache(codec, m.latent_cache), DipDataset(cfg.data.path), batch_size,
                                   progress, prompts)
    text = TextCache(text_cls.from_pretrained(m.checkpoint, max_tokens=m.max_text_tokens, dtype=DTYPES[m.dtype],
                                              device=device), m.latent_cache)
    unique = list(dict.fromkeys(prompts))
    for i in range(0, len(unique), batch_size):
        text.encode(unique[i: i + batch_size])
    return {"images": images, "prompts": (text.hits, text.misses)}
