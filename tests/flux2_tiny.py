"""A tiny FLUX.2 [klein] folder for tests: the real classes at a tiny size, written with ``save_pretrained``.

``Flux2KleinPipeline`` components with random weights from a seed (nothing downloaded): a 2+2-block
``Flux2Transformer2DModel`` (head dim 16, 4 RoPE axes), an ``AutoencoderKLFlux2`` with FLUX.2's latent
layout (32 latent channels, 8x downsampling, 128-channel tokens of 16 px) and random batch-norm statistics, a
28-layer Qwen3 of width 16 (so the pipeline's default hidden layers 9, 18, 27 exist) with a byte-level BPE
tokenizer and a Qwen3-style chat template, and the flow-matching scheduler with dynamic shifting.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet of a byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer():
    """A character-level byte BPE ``Qwen2Tokenizer`` with Qwen's special tokens and a chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_flux2_components(seed: int = 0, width: int = 16, num_layers: int = 2, num_single_layers: int = 2,
                          guidance_embeds: bool = False) -> dict:
    """``Flux2KleinPipeline`` components at a tiny size with random weights from ``seed``."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_tokenizer()
        text = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True))
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=32, norm_num_groups=4,
            sample_size=64, use_quant_conv=True, use_post_quant_conv=True)
        vae.bn.running_mean.copy_(torch.randn(128) * 0.2)  # non-trivial statistics: normalisation is tested
        vae.bn.running_var.copy_(torch.rand(128) + 0.5)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * width,
            timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text, "tokenizer": tok, "transformer": transformer}


def write_tiny_flux2_folder(path: str | Path, **kwargs) -> Path:
    """Write :func:`tiny_flux2_components` as a diffusers FLUX.2 [klein] folder (``save_pretrained``)."""
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    Flux2KleinPipeline(**tiny_flux2_components(**kwargs)).save_pretrained(path, safe_serialization=True)
    return path
