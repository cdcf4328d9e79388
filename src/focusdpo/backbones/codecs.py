"""Image codecs: images in ``[0, 1]`` <-> token sequences (the :class:`~focusdpo.backbones.base.Codec` protocol).

The tiny model works in pixel space: :class:`PixelCodec` cuts the image into ``patch x patch`` patches and
maps ``[0, 1]`` to ``[-1, 1]`` so that data and unit-variance noise have comparable scales. A full FLUX
loader supplies a VAE codec with the same three methods.
"""

from __future__ import annotations

import torch

from focusdpo.backbones.base import Tokens


class PixelCodec:
    """Patchify codec: ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, (H/p)(W/p), 3 p p]`` in ``[-1, 1]``.

    Token channels are ordered ``(c, py, px)``; tokens are row-major over the ``(H/p, W/p)`` grid.
    """

    def __init__(self, patch: int) -> None:
        if patch < 1:
            raise ValueError(f"PixelCodec: patch={patch} is invalid: allowed >= 1")
        self.patch = patch

    @property
    def channels(self) -> int:
        return 3 * self.patch * self.patch

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = size
        if h % self.patch or w % self.patch or h < 1 or w < 1:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of the codec patch {self.patch}: "
                             f"resize or crop the image to a multiple of {self.patch}")
        return h // self.patch, w // self.patch

    def encode(self, images: torch.Tensor) -> Tokens:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"PixelCodec.encode: images of shape {tuple(images.shape)}: expected [B, 3, H, W]")
        b, _, hh, ww = images.shape
        h, w = self.token_grid((hh, ww))
        p = self.patch
        x = images * 2.0 - 1.0
        x = x.reshape(b, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # B h w c py px
        return Tokens(x.reshape(b, h * w, 3 * p * p), (h, w))

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        p = self.patch
        if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] != self.channels:
            raise ValueError(f"PixelCodec.decode: tokens of shape {tuple(tokens.shape)} do not fit grid {grid}: "
                             f"expected [B, {h * w}, {self.channels}]")
        b = tokens.shape[0]
        x = tokens.reshape(b, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * p, w * p)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
