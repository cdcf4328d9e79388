"""The backbone contract (DESIGN section 3): the only thing the trainer and the sampler use.

A backbone turns images into tokens and back, prompts into text conditioning, and predicts the flow-matching
velocity of noisy target tokens given text and K reference token blocks, optionally returning the hidden
states and the attention field of the tapped block(s) (the focus tap, :class:`FocusTap`) from the same
forward pass. LoRA adapters attach to ``trainable()``;
``reference()`` switches them off for the frozen reference model of DPO.

Conventions (FLUX flow matching): ``x_t = (1 - s) x_0 + s eps`` with ``s`` (``sigma``) in ``[0, 1]``,
``s = 1`` pure noise, and the model predicts ``v = eps - x_0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class Tokens:
    """Image tokens on a grid.

    tokens: ``float [B, N, C]`` with ``N = h * w`` in row-major order; grid: ``(h, w)``.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        h, w = self.grid
        if self.tokens.ndim != 3 or self.tokens.shape[1] != h * w:
            raise ValueError(f"Tokens: tokens of shape {tuple(self.tokens.shape)} do not fit grid {self.grid}: "
                             f"expected [B, {h * w}, C]")

    def to(self, *args: Any, **kwargs: Any) -> Tokens:
        return Tokens(self.tokens.to(*args, **kwargs), self.grid)

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class TextCond:
    """Text conditioning: per-token features ``tokens [B, L, D_txt]`` and a pooled vector ``pooled [B, P]``."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.pooled.ndim != 2 or self.tokens.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"TextCond: expected tokens [B, L, D] and pooled [B, P], got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.pooled.shape)}")

    def to(self, *args: Any, **kwargs: Any) -> TextCond:
        return TextCond(self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def repeat(self, n: int) -> TextCond:
        """Each prompt repeated ``n`` times along the batch (``[B*n, ...]``, prompt-major)."""
        return TextCond(self.tokens.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    @staticmethod
    def cat(conds: Sequence[TextCond]) -> TextCond:
        return TextCond(torch.cat([c.tokens for c in conds]), torch.cat([c.pooled for c in conds]))


@dataclass
class FocusTap:
    """What the policy's own forward says about where it puts each subject (DESIGN 2.3), detached.

    ``target``: ``[B, N, D]`` hidden states of the target tokens; ``refs``: K tensors ``[B, M_k, D]``, each
    reference's hidden states (both: the image stream of the tapped block, averaged over blocks when several
    are tapped); ``field``: ``[B, K, N]`` float32 in ``[0, 1]``, the attention field: for target query ``n``
    the softmax mass on reference k's keys weighted by k's token mask, averaged over heads (and over the
    tapped blocks); ``blocks``: block name -> that block's own field ``[B, K, N]``.
    """

    target: torch.Tensor
    refs: list[torch.Tensor]
    field: torch.Tensor
    blocks: dict[str, torch.Tensor]

    @staticmethod
    def from_blocks(feats: torch.Tensor | None, n_hidden: int, fields: dict[str, torch.Tensor], n_target: int,
                    ref_grids: Sequence[tuple[int, int]], names: Sequence[str]) -> FocusTap:
        """The tap from the tapped blocks' mean image-stream state ``feats [B, N + sum M_k, D]`` (over
        ``n_hidden`` blocks) and their fields ``[B, K, N]`` (averaged here)."""
        missing = [n for n in names if n not in fields]
        if missing or feats is None or n_hidden != len(names):
            raise RuntimeError(f"focus tap: blocks {missing or list(names)} ran no tapped attention; the backbone's "
                               "attention processors were replaced after it was built")
        sizes = [h * w for h, w in ref_grids]
        refs = list(torch.split(feats[:, n_target:], sizes, dim=1))
        field = torch.stack([fields[n] for n in names]).mean(0)
        return FocusTap(feats[:, :n_target], refs, field, {n: fields[n] for n in names})

    def select(self, index: slice | torch.Tensor) -> FocusTap:
        """The tap of a sub-batch (e.g. ``slice(0, B)``: the positives of a ``[positives; negatives]`` batch)."""
        return FocusTap(self.target[index], [r[index] for r in self.refs], self.field[index],
                        {k: v[index] for k, v in self.blocks.items()})


@runtime_checkable
class Codec(Protocol):
    """Images <-> tokens. The tiny model patchifies pixels; a full FLUX loader plugs in its VAE here."""

    patch: int  # pixels per token side

    @property
    def channels(self) -> int:
        """Channels per token ``C``."""

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` pixels -> ``(h, w)`` tokens; raises if ``H`` or ``W`` is not a multiple of ``patch``."""

    def encode(self, images: torch.Tensor) -> Tokens:
        """``float [B, 3, H, W]`` in ``[0, 1]`` -> :class:`Tokens`."""

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``float [B, N, C]`` on ``grid`` -> images ``float [B, 3, H, W]`` clamped to ``[0, 1]``."""


@runtime_checkable
class TextEncoder(Protocol):
    """Prompts -> :class:`TextCond`. The tiny model has a small learned encoder; FLUX uses T5 + CLIP."""

    @property
    def dim(self) -> int:
        """Per-token feature width ``D_txt``."""

    @property
    def pooled_dim(self) -> int:
        """Pooled vector width ``P``."""

    def encode(self, prompts: Sequence[str]) -> TextCond:
        """A batch of prompts -> ``TextCond`` on the encoder's device."""


@runtime_checkable
class Backbone(Protocol):
    """An in-context personalized generator (DESIGN section 3, docs/architecture.md)."""

    patch: int  # pixels per token side

    @property
    def device(self) -> torch.device: ...

    @property
    def tap_layer(self) -> str:
        """The block(s) ``predict(..., tap=True)`` reads: ``"double:i"``, ``"single:i"`` or ``"all"``."""

    def encode_images(self, images: torch.Tensor) -> Tokens:
        """``float [B, 3, H, W]`` in ``[0, 1]`` -> ``Tokens [B, N, C]``."""

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``float [B, N, C]`` -> images ``float [B, 3, H, W]`` in ``[0, 1]``."""

    def encode_prompts(self, prompts: Sequence[str]) -> TextCond: ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCond, refs: Sequence[Tokens],
                grid: tuple[int, int], tap: bool = False, ref_masks: Sequence[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, FocusTap | None]:
        """Velocity of the noisy target tokens.

        x_t: ``[B, N, C]``; t: ``[B]`` sigma in ``[0, 1]``; refs: K >= 1 clean reference blocks of
        ``[B, M_k, C]``; ref_masks: K ``[B, M_k]`` token masks in [0, 1] weighting the attention field (None:
        all ones). Returns ``pred [B, N, C]`` and, with ``tap``, a :class:`FocusTap` from the same forward
        (detached); else ``None``.
        """

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]: ...

    def trainable(self) -> nn.Module:
        """The module LoRA attaches to."""

    def reference(self) -> AbstractContextManager[None]:
        """Adapters off inside the block, restored in ``finally`` (the frozen DPO reference model)."""

    def add_lora(self, cfg: Any) -> int:
        """Attach LoRA (``cfg``: :class:`~focusdpo.config.LoraConfig`) to ``trainable()``; returns its size."""

    def lora_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_lora_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None: ...
