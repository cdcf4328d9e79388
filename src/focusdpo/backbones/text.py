"""Text encoders: prompts -> :class:`~focusdpo.backbones.base.TextCond` (the ``TextEncoder`` protocol).

:class:`TinyTextEncoder` is the learned encoder of the built-in model: a word-level vocabulary (the
synthetic world's), an embedding with learned positions and one transformer layer. A full FLUX loader
supplies T5 (per-token features) + CLIP (pooled vector) behind the same ``encode`` method.

Words are lower-cased runs of letters and digits; a word outside the vocabulary is an error (the tiny
model has never seen it, and silently dropping it would change what the prompt asks for).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from focusdpo.backbones.base import TextCond

_WORD = re.compile(r"[a-z0-9]+")
PAD = "<pad>"


def split_words(prompt: str) -> list[str]:
    """``"A red cat, left."`` -> ``["a", "red", "cat", "left"]``."""
    return _WORD.findall(prompt.lower())


class TinyTextEncoder(nn.Module):
    """Word embedding + learned positions + one transformer encoder layer.

    ``encode(prompts)`` returns ``tokens [B, max_tokens, dim]`` and ``pooled [B, dim]`` (mean over positions,
    padding included: the empty prompt is a valid, learnable "unconditional" input for guidance).
    """

    def __init__(self, vocabulary: Sequence[str], dim: int = 64, max_tokens: int = 24, heads: int = 4) -> None:
        super().__init__()
        words = [w.lower() for w in vocabulary]
        bad = [w for w in words if not _WORD.fullmatch(w)]
        if bad or len(set(words)) != len(words) or not words:
            raise ValueError(f"TinyTextEncoder: vocabulary must be non-empty unique words of [a-z0-9]; "
                             f"bad entries {bad[:5]}, {len(words) - len(set(words))} duplicates")
        if dim % heads:
            raise ValueError(f"TinyTextEncoder: dim={dim} must be a multiple of heads={heads}")
        self.vocabulary = list(words)
        self.index = {w: i + 1 for i, w in enumerate(words)}  # 0 is padding
        self.max_tokens = max_tokens
        self._dim = dim
        self.embed = nn.Embedding(len(words) + 1, dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def pooled_dim(self) -> int:
        return self._dim

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``long [B, max_tokens]`` word ids (0 = padding); unknown words and overlong prompts raise."""
        out = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = split_words(prompt)
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"prompt {prompt!r}: words {unknown} are not in the tiny text encoder's "
                                 f"vocabulary of {len(self.index)} words: use the world's words")
            if len(words) > self.max_tokens:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than model.max_text_tokens="
                                 f"{self.max_tokens}: raise model.max_text_tokens (needs a retrained base)")
            out[b, : len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.long)
        return out

    def encode(self, prompts: Sequence[str]) -> TextCond:
        ids = self.ids(prompts).to(self.pos.device)
        h = self.norm(self.layer(self.embed(ids) + self.pos))
        return TextCond(h, h.mean(dim=1))

    def forward(self, prompts: Sequence[str]) -> TextCond:
        return self.encode(prompts)
