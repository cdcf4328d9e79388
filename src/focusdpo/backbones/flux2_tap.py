"""The focus tap of the FLUX.2 backbone: :mod:`focusdpo.backbones.flux_tap`'s design on FLUX.2's two attentions.

FLUX.2 has two attention modules: ``Flux2Attention`` in the double-stream blocks (separate ``to_q/k/v`` for the
image stream and ``add_q/k/v_proj`` for the text stream, as FLUX.1) and ``Flux2ParallelSelfAttention`` in the
single-stream blocks (one fused ``to_qkv_mlp_proj`` whose output is split into q, k, v and the MLP input, and
one fused ``to_out`` over the attention output and the MLP activation). Each gets a processor that computes the
block's attention itself with the stock processor's operations in the stock order (bit-identical output,
tested against ``Flux2AttnProcessor`` / ``Flux2ParallelSelfAttnProcessor``), in every forward, whether or not
the block is tapped (gradient checkpointing replays it). Armed for a block, it also computes the attention
field ``[B, K, N]`` from the same rotated queries and keys with
:meth:`~focusdpo.backbones.flux_tap.FieldTapProcessor._field` (one more fused attention call of the target
queries against all keys with mask-weighted reference indicators as values; see that module for the math).

The joint sequence is ``[text | target | ref_1 .. ref_K]`` in both block kinds (text first), which is the
layout :class:`~focusdpo.backbones.flux_tap.TapStore` describes. Any other processor (the KV-cache ones, a
user's own) runs as it is, and tapping its block is refused with a message.
"""

from __future__ import annotations

import torch
from torch import nn

from focusdpo.backbones.flux_tap import FieldTapProcessor, TapStore, block_names


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


class Flux2FieldTapProcessor(FieldTapProcessor):
    """Processor of a FLUX.2 double-stream block (``Flux2Attention``) that can also return the attention field.

    Args: as :class:`~focusdpo.backbones.flux_tap.FieldTapProcessor`; ``inner`` must be a plain
    ``Flux2AttnProcessor`` for the block to be tappable.
    """

    def __init__(self, name: str, store: TapStore, inner: object) -> None:
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

        self.name, self.store, self.inner = name, store, inner
        self.own = type(inner) is Flux2AttnProcessor

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
                 = None, attention_mask: torch.Tensor | None = None, image_rotary_emb: object = None,
                 **kwargs: object) -> object:
        armed = self._armed(attn, kwargs, "Flux2AttnProcessor")
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

    def _armed(self, attn: nn.Module, kwargs: dict, stock: str) -> bool:
        """Whether this forward captures the field; refuses what the tap cannot reproduce."""
        armed = self.store.armed and self.name in self.store.blocks
        if not self.own and armed:
            raise ValueError(f"the focus tap of block {self.name} needs diffusers' plain {stock}, found "
                             f"{type(self.inner).__name__}; tap another block or restore the processor")
        if self.own and (kwargs or getattr(attn, "fused_projections", False)):
            raise ValueError(f"the focus tap of block {self.name} supports plain FLUX.2 attention only (no fused "
                             f"q/k/v projections, no extra arguments {sorted(kwargs)}); unfuse the projections")
        return armed

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                armed: bool) -> torch.Tensor:
        """The block's attention ``[B, L, H * d]`` (as the stock processor) and, when armed, the field."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        backend = getattr(self.inner, "_attention_backend", None)
        out = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend,
                                    parallel_config=getattr(self.inner, "_parallel_config", None))
        if armed:
            self.store.fields[self.name] = self._field(query.detach(), key.detach(), backend)
        return out.flatten(2, 3).to(query.dtype)

    @staticmethod
    def _qkv(attn: nn.Module, hidden: torch.Tensor, encoder: torch.Tensor | None, rotary: object
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected, normalised and rotated ``[B, L, H, d]`` queries, keys and values, text first."""
        from diffusers.models.embeddings import apply_rotary_emb

        q, k, v = _heads(attn, attn.to_q(hidden)), _heads(attn, attn.to_k(hidden)), _heads(attn, attn.to_v(hidden))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder is not None and attn.added_kv_proj_dim is not None:
            eq, ek = _heads(attn, attn.add_q_proj(encoder)), _heads(attn, attn.add_k_proj(encoder))
            ev = _heads(attn, attn.add_v_proj(encoder))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q, k, v


class Flux2ParallelFieldTapProcessor(Flux2FieldTapProcessor):
    """Processor of a FLUX.2 single-stream block (``Flux2ParallelSelfAttention``: fused qkv + MLP)."""

    def __init__(self, name: str, store: TapStore, inner: object) -> None:
        from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttnProcessor

        self.name, self.store, self.inner = name, store, inner
        self.own = type(inner) is Flux2ParallelSelfAttnProcessor

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: object = None, **kwargs: object) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        armed = self._armed(attn, kwargs, "Flux2ParallelSelfAttnProcessor")
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
    names = block_names(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    n_double = len(transformer.transformer_blocks)
    for i, (name, block) in enumerate(zip(names, blocks, strict=True)):
        inner = block.attn.processor
        if isinstance(inner, FieldTapProcessor):
            inner = inner.inner
        kind = Flux2FieldTapProcessor if i < n_double else Flux2ParallelFieldTapProcessor
        block.attn.set_processor(kind(name, store, inner))
    return names
