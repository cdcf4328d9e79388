"""The focus tap of the FLUX.2 backbone: :mod:`focusdpo.backbones.flux_tap`'s design on FLUX.2's two attentions.

FLUX.2 has two attention modules: ``Flux2Attention`` in the double-stream blocks (separate ``to_q/k/v`` for the
image stream and ``add_q/k/v_proj`` for the text stream, as FLUX.1) and ``Flux2ParallelSelfAttention`` in the
single-stream blocks (one fused ``to_qkv_mlp_proj`` whose output is split into q, k, v and the MLP input, and
one fused ``to_out`` over the attention output and the MLP activation). Each gets a processor that computes the
block's attention itself with the stock processor's operations in the stock order (bit-identical output,
tested against ``Flux2AttnProcessor`` / ``Flux2ParallelSelfAttnProcessor``), in every forward, whether or not
the block is tapped (gradient checkpointing replays it). Armed for a block, it also computes the attention
field ``[B, K, N]`` from the same rotated queries and keys with
:class:`~focusdpo.backbones.flux_tap.FieldTapProcessor`'s ``_field`` (one more fused attention call of the target
queries against all keys with mask-weighted reference indicators as values; see that module for the math).

The joint sequence is ``[text | target | ref_1 .. ref_K]`` in both block kinds (text first), which is the
layout :class:`~focusdpo.backbones.flux_tap.TapStore` describes. Any other processor (the KV-cache ones, a
user's own) runs as it is, and tapping its block is refused with a message.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from focusdpo.backbones import flux_tap
from focusdpo.backbones.flux_tap import FieldTapProcessor, TapStore


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


class Flux2FieldTapProcessor(FieldTapProcessor):
    """Processor of a FLUX.2 double-stream block (``Flux2Attention``) that can also return the attention field.

    Args: as :class:`~focusdpo.backbones.flux_tap.FieldTapProcessor`, whose arming, projections (the same
    ``to_q/k/v`` + ``add_*_proj`` layout as FLUX.1), attention and field it uses.
    """

    @staticmethod
    def stock_class() -> type:
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

        return Flux2AttnProcessor

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
                 = None, attention_mask: torch.Tensor | None = None, image_rotary_emb: object = None,
                 **kwargs: object) -> object:
        armed = self._armed(attn, kwargs)
        if not self.own:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                              **kwargs)
        query, key, value = self._qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self._attend(query, key, value, attention_mask, armed)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1],
                                            out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


class Flux2ParallelFieldTapProcessor(FieldTapProcessor):
    """Processor of a FLUX.2 single-stream block (``Flux2ParallelSelfAttention``: fused qkv + MLP)."""

    @staticmethod
    def stock_class() -> type:
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttnProcessor

        return Flux2ParallelSelfAttnProcessor

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: object = None, **kwargs: object) -> torch.Tensor:
        armed = self._armed(attn, kwargs)
        if not self.own:
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)  # the stock split (tensor-parallel safe)
        qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
        q, k, v = (_heads(attn, x) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self._attend(q, k, v, attention_mask, armed)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def install(transformer: nn.Module, store: TapStore) -> list[str]:
    """Wrap the attention processor of every block of a ``Flux2Transformer2DModel``; returns the block names."""
    return flux_tap.install(transformer, store, Flux2FieldTapProcessor, Flux2ParallelFieldTapProcessor)
