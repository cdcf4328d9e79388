"""The focus tap of the FLUX backbones: hidden states and the attention field, from the policy's own forward.

Every attention module of the transformer gets a :class:`FieldTapProcessor`. In place of diffusers' plain
``FluxAttnProcessor`` it computes the block's attention itself from the same parts (to_q/k/v through any
LoRA, RMS norms, rotary embedding, ``dispatch_attention_fn``), with a bit-identical output (tested), in every
forward: a block must run the same operations whether or not it is tapped, or gradient checkpointing's
recompute (which runs after the tap is disarmed) would not match the forward it replays. Any other processor
(IP-Adapter, a user's own) is called as it is, and tapping its block is refused with a message. Armed for a
block, the processor also computes, from the *same* rotated queries and keys, the attention field:

    F_k[n] = mean_heads  sum_j m_k[j] softmax_j(q_n . key_j / sqrt(d))      j over reference k's tokens

the softmax probability mass that target query ``n`` puts on reference k's keys, weighted by k's token mask
(DESIGN 2.3). The softmax normaliser runs over *all* keys (text, target, every reference), so the field is
the mass the model really routes. It is computed with one more fused attention call of the target queries
only: ``attention(q_target, keys, V)`` where ``V[j, k] = m_k[j]`` for reference k's token ``j`` and 0
elsewhere; its output channel ``k`` is exactly ``F_k`` per head. No ``[N, L]`` logit matrix is kept: flash or
memory-efficient kernels never materialise it, and the math kernel (CPU) materialises it for the target rows
only, inside the call. Extra cost per tapped block: one attention of ``N`` queries against all keys with
value width ``head_dim`` (measured in ``benchmarks/bench_step.py``). Everything is detached (``no_grad``).

The indicator values have the head width (zero-padded), so the call is the same shape class as the block's
own attention and any backend that runs one runs the other. More references than ``head_dim`` are handled in
chunks of ``head_dim`` columns.

Gradient checkpointing recomputes a block in the backward pass, after ``predict`` has disarmed the store: the
recompute runs the same attention and captures nothing (the field is computed under ``no_grad`` and saves no
tensor for backward). Under ``torch.compile`` the armed/unarmed branch is a
guard on a Python attribute: each block compiles at most two variants.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

DOUBLE, SINGLE = "double", "single"


def block_names(n_double: int, n_single: int) -> list[str]:
    """Names of a FLUX transformer's blocks in forward order: ``double:0..``, then ``single:0..``."""
    return [f"{DOUBLE}:{i}" for i in range(n_double)] + [f"{SINGLE}:{i}" for i in range(n_single)]


def parse_tap_layer(spec: str | int | None, n_double: int, n_single: int) -> list[str]:
    """The blocks a ``focus.tap_layer`` value names.

    ``"double:i"`` / ``"single:i"``: one block; ``"all"``: every block (fields and hidden states are
    averaged over them); an int ``i`` (older configs): ``double:i``; None: the middle double-stream block.
    Raises ValueError naming the value and what is allowed.
    """
    allowed = (f"double:0..{n_double - 1}, single:0..{n_single - 1}, all, or null (the middle double block)")
    if spec is None:
        return [f"{DOUBLE}:{n_double // 2}"]
    if isinstance(spec, bool):
        raise ValueError(f"focus.tap_layer={spec!r} is invalid: allowed {allowed}")
    text = f"{DOUBLE}:{spec}" if isinstance(spec, int) else str(spec).strip().lower()
    if text == "all":
        return block_names(n_double, n_single)
    kind, _, index = text.partition(":")
    limits = {DOUBLE: n_double, SINGLE: n_single}
    if kind not in limits or not index.isdigit() or not int(index) < limits[kind]:
        raise ValueError(f"focus.tap_layer={spec} is invalid for this model: allowed {allowed}")
    return [f"{kind}:{int(index)}"]


@dataclass
class TapStore:
    """What one armed forward asks for and what its processors leave behind.

    ``blocks``: names to capture; ``text_len``/``n_target``/``ref_sizes``: the joint sequence's layout
    ``[text | target | ref_1 .. ref_K]``; ``values``: ``[B, L_img, K]`` mask-weighted reference indicators
    over the image tokens (zeros on the target); ``fields``: block name -> ``[B, K, N]`` float32.
    """

    armed: bool = False
    blocks: frozenset[str] = frozenset()
    text_len: int = 0
    n_target: int = 0
    values: torch.Tensor | None = None
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def arm(self, blocks: Sequence[str], text_len: int, n_target: int, values: torch.Tensor) -> None:
        self.armed, self.blocks = True, frozenset(blocks)
        self.text_len, self.n_target, self.values = text_len, n_target, values
        self.fields = {}

    def disarm(self) -> None:
        self.armed, self.values = False, None


def reference_values(ref_masks: Sequence[torch.Tensor], n_target: int) -> torch.Tensor:
    """``[B, N + sum M_k, K]``: column k holds reference k's token mask on its own tokens, 0 elsewhere."""
    b, k = ref_masks[0].shape[0], len(ref_masks)
    blocks = [ref_masks[0].new_zeros(b, n_target, k)]
    for i, m in enumerate(ref_masks):
        part = m.new_zeros(b, m.shape[1], k)
        part[..., i] = m
        blocks.append(part)
    return torch.cat(blocks, dim=1)


class FieldTapProcessor:
    """Attention processor of one FLUX block that, when armed for it, also returns the attention field.

    Args:
        name: the block's name (:func:`block_names`).
        store: the backbone's :class:`TapStore`, shared by every block.
        inner: the processor it replaces; the block is computed here only when ``inner`` is exactly
            :meth:`stock_class` (else ``inner`` runs, and tapping the block is refused).

    Subclasses for other families (:mod:`focusdpo.backbones.flux2_tap`) override :meth:`stock_class` and
    ``__call__``'s projections and output; the arming, the attention and the field are shared.
    """

    def __init__(self, name: str, store: TapStore, inner: object) -> None:
        self.name, self.store, self.inner = name, store, inner
        self.own = type(inner) is self.stock_class()

    @staticmethod
    def stock_class() -> type:
        """The diffusers processor whose output this one reproduces bit for bit."""
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return FluxAttnProcessor

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
            return out
        n_text = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())

    def _armed(self, attn: nn.Module, kwargs: dict) -> bool:
        """Whether this forward captures the field; refuses what the tap cannot reproduce."""
        armed = self.store.armed and self.name in self.store.blocks
        stock = self.stock_class().__name__
        if not self.own and armed:
            raise ValueError(f"the focus tap of block {self.name} needs diffusers' plain {stock}, found "
                             f"{type(self.inner).__name__}; tap another block or restore the processor")
        if self.own and (kwargs or getattr(attn, "fused_projections", False)):
            raise ValueError(f"the focus tap of block {self.name} supports {stock}'s plain attention only (no "
                             f"fused projections, no extra arguments {sorted(kwargs)}); unfuse the projections")
        return armed

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                armed: bool) -> torch.Tensor:
        """The block's attention ``[B, L, H * d]`` (as the stock processor) and, when armed, the field."""
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
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(hidden)), heads(attn.to_v(hidden))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder is not None and attn.added_kv_proj_dim is not None:
            eq, ek = heads(attn.add_q_proj(encoder)), heads(attn.add_k_proj(encoder))
            ev = heads(attn.add_v_proj(encoder))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q, k, v

    def _field(self, query: torch.Tensor, key: torch.Tensor, backend: object) -> torch.Tensor:
        """``[B, K, N]`` float32: per-reference softmax mass of the target queries, mean over heads."""
        store = self.store
        with torch.no_grad():
            start = store.text_len
            q_tgt = query[:, start:start + store.n_target]
            b, length, h, d = key.shape
            values = store.values.to(key.dtype)  # [B, L_img, K]
            values = torch.cat([values.new_zeros(b, start, values.shape[2]), values], dim=1)
            if values.shape[1] != length:
                raise ValueError(f"focus tap of block {self.name}: the sequence has {length} tokens but the layout "
                                 f"has {values.shape[1]} (text {start} + image tokens)")
            parts = []
            for chunk in values.split(d, dim=2):  # at most head_dim references per call
                v = torch.nn.functional.pad(chunk, (0, d - chunk.shape[2]))[:, :, None].expand(b, length, h, d)
                mass = dispatch_attention_fn(q_tgt, key, v, backend=backend)  # [B, N, H, d]
                parts.append(mass[..., : chunk.shape[2]].float().mean(dim=2))
            return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def install(transformer: nn.Module, store: TapStore, double: type[FieldTapProcessor] = FieldTapProcessor,
            single: type[FieldTapProcessor] = FieldTapProcessor) -> list[str]:
    """Wrap the attention processor of every block of a FLUX-family transformer (``transformer_blocks`` then
    ``single_transformer_blocks``) with ``double`` / ``single``; returns the block names."""
    names = block_names(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    kinds = [double] * len(transformer.transformer_blocks) + [single] * len(transformer.single_transformer_blocks)
    for name, block, kind in zip(names, block_modules(transformer).values(), kinds, strict=True):
        inner = block.attn.processor
        if isinstance(inner, FieldTapProcessor):
            inner = inner.inner
        block.attn.set_processor(kind(name, store, inner))
    return names


def tap_masks(refs: Sequence[torch.Tensor], ref_masks: Sequence[torch.Tensor] | None, device: torch.device
              ) -> list[torch.Tensor]:
    """Reference token masks ``[B, M_k]`` float32 for the attention field (all ones when not given).

    refs: the K reference token blocks ``[B, M_k, C]``.
    """
    if ref_masks is None:
        return [torch.ones(r.shape[:2], device=device) for r in refs]
    if len(ref_masks) != len(refs):
        raise ValueError(f"predict: {len(ref_masks)} reference masks for {len(refs)} references")
    for k, (m, r) in enumerate(zip(ref_masks, refs, strict=True)):
        if tuple(m.shape) != tuple(r.shape[:2]):
            raise ValueError(f"predict: ref_masks[{k}] has shape {tuple(m.shape)}, expected {tuple(r.shape[:2])} "
                             "(one value per reference token)")
    return [m.to(device, torch.float32) for m in ref_masks]


class RunningMean:
    """Mean of the tapped blocks' hidden states, kept as one running sum (``tap_layer=all`` on a 57-block model
    would otherwise hold 57 ``[B, L, D]`` tensors until the forward ends). One block keeps its dtype; several
    are summed in float32."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        self.total = x if self.total is None else self.total.float() + x.float()
        self.count += 1

    def value(self) -> torch.Tensor | None:
        return self.total if self.count <= 1 else self.total / self.count


@contextmanager
def armed(store: TapStore, transformer: nn.Module, blocks: Sequence[str], text_len: int, n_target: int,
          ref_masks: Sequence[torch.Tensor]) -> Iterator[tuple[RunningMean, dict[str, torch.Tensor]]]:
    """One tapped forward: arm the store and hook the tapped blocks' outputs; always unhook and disarm.

    Yields ``(hidden, fields)``, filled by the forward run inside: the running mean of the tapped blocks'
    image-stream outputs ``[B, N + sum M_k, D]`` (a block returning ``(text, image)``, or the joint
    ``[text | image]`` stream of a FLUX.2 single block) and block name -> field ``[B, K, N]``.
    """
    hidden = RunningMean()
    store.arm(blocks, text_len, n_target, reference_values(ref_masks, n_target))
    modules = block_modules(transformer)

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        hidden.add((output[1] if isinstance(output, tuple) else output[:, text_len:]).detach())

    handles = [modules[name].register_forward_hook(hook) for name in blocks]
    try:
        yield hidden, store.fields
    finally:
        for handle in handles:
            handle.remove()
        store.disarm()


def block_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    """Block name -> block module, in forward order."""
    names = block_names(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    return dict(zip(names, list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks),
                    strict=True))
