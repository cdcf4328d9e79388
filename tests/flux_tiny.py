"""A tiny FLUX.1 folder for tests: FLUX's real classes at a tiny size, written with ``save_pretrained``.

``FluxPipeline`` components with random weights from a seed and locally built tokenizers (nothing
downloaded); ``focusdpo.backbones.flux_pretrained`` loads the folder through the very code a user's run takes.
Also a random UNO LoRA state dict (:func:`synthetic_uno_state_dict`). Moved here from
``focusdpo.backbones.flux_pretrained`` and ``focusdpo.backbones.uno``: test fixtures live under ``tests/``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from focusdpo.backbones.uno import DOUBLE_PAIRS, SINGLE_PAIRS

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


def synthetic_uno_state_dict(transformer: nn.Module, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict laid out exactly as UNO's ``set_lora`` + ``train.py`` save it for ``transformer``.

    Every double and single block, ``down [r, in]`` (normal, std ``1/r`` as UNO initialises it) and
    ``up [out, r]`` (normal, std 0.05; UNO starts it at zero and trains it): ``qkv_lora*`` ``in = D,
    out = 3D``; ``proj_lora1/2`` ``D -> D``; single ``proj_lora`` ``D + mlp -> D``.
    """
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    d = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].mlp_hidden_dim if cfg.num_single_layers else 4 * d
    shapes = {"qkv_lora1": (d, 3 * d), "proj_lora1": (d, d), "qkv_lora2": (d, 3 * d), "proj_lora2": (d, d),
              "qkv_lora": (d, 3 * d), "proj_lora": (d + mlp, d)}
    sd = {}
    for kind, n, pairs in (("double_blocks", cfg.num_layers, DOUBLE_PAIRS),
                           ("single_blocks", cfg.num_single_layers, SINGLE_PAIRS)):
        for i in range(n):
            for pair in pairs:
                fan_in, fan_out = shapes[pair]
                sd[f"{kind}.{i}.processor.{pair}.down.weight"] = torch.randn(rank, fan_in, generator=g) / rank
                sd[f"{kind}.{i}.processor.{pair}.up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.05
    return sd
