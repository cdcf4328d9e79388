"""FLUX.2 VAE codec: images in ``[0, 1]`` <-> patchified, batch-normalised VAE latent tokens (``Codec``).

FLUX.2 encodes with :class:`~diffusers.AutoencoderKLFlux2` (32 latent channels, 8x spatial compression), takes
the mode of the posterior, *patchifies* each 2x2 latent patch into ``4 * 32 = 128`` channels ordered
``(c, dy, dx)``, normalises every one of those channels with the VAE's own batch-norm running statistics
(``z = (x - running_mean) / sqrt(running_var + batch_norm_eps)``) and lays the ``h x w`` grid out row-major: one
token per ``16 x 16`` pixels. This is ``Flux2KleinPipeline._encode_vae_image`` followed by ``_pack_latents``,
and decoding is the pipeline's ``_unpack_latents_with_ids`` + batch-norm inverse + ``_unpatchify_latents`` (the
order differs from FLUX.1's, where normalisation comes before packing with a scalar scale and shift).

Everything else (offloading, fingerprint for :class:`~focusdpo.backbones.vae.LatentCache`, token grid) is the
FLUX.1 codec's, so this class only replaces the latent normalisation and layout.
"""

from __future__ import annotations

import torch

from focusdpo.backbones.base import Tokens
from focusdpo.backbones.vae import FluxVAECodec


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H', W']`` -> ``[B, 4C, H'/2, W'/2]``, channels ``(c, dy, dx)`` (pipeline's ``_patchify_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"patchify: latent grid {h}x{w} must be even on both sides to patchify 2x2")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, 4C, h, w]`` -> ``[B, C, 2h, 2w]``."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


class Flux2VAECodec(FluxVAECodec):
    """The FLUX.2 VAE as a :class:`~focusdpo.backbones.base.Codec`.

    ``encode``: ``float [B, 3, H, W]`` in ``[0, 1]`` -> ``Tokens [B, (H/16)(W/16), 128]`` (normalised latents,
    float32). ``decode``: the inverse, images ``float [B, 3, H, W]`` clamped to ``[0, 1]``.
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device | str | None = None, offload: bool = False) -> None:
        cfg = vae.config
        bn = getattr(vae, "bn", None)
        if bn is None or getattr(bn, "running_var", None) is None or "batch_norm_eps" not in cfg:
            raise ValueError(f"Flux2VAECodec: {type(vae).__name__} has no batch-norm latent statistics: pass a "
                             f"diffusers AutoencoderKLFlux2 (the vae/ folder of a FLUX.2 model)")
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = int(cfg.latent_channels)
        self.vae_scale = 2 ** (len(cfg.block_out_channels) - 1)
        self.patch = 2 * self.vae_scale
        self.eps = float(cfg.batch_norm_eps)
        self.offload = offload
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        self.vae.to("cpu" if offload else self.device)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = "vae", dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, offload: bool = False) -> Flux2VAECodec:
        """Load ``AutoencoderKLFlux2`` (safetensors only) from a local diffusers folder or hub id."""
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True)
        return cls(vae, device=device or "cpu", offload=offload)

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-norm mean and std ``[1, 4C, 1, 1]`` float32 on the execution device."""
        bn = self.vae.bn
        mean = bn.running_mean.float().view(1, -1, 1, 1).to(self.device)
        std = torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + self.eps).to(self.device)
        return mean, std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Tokens:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Flux2VAECodec.encode: images of shape {tuple(images.shape)}: expected [B, 3, H, W]")
        grid = self.token_grid(tuple(images.shape[-2:]))
        with self._placed():
            x = images.to(self.device, self.dtype) * 2.0 - 1.0
            latents = self.vae.encode(x).latent_dist.mode()
        mean, std = self._stats()
        z = (patchify(latents.float()) - mean) / std  # [B, 4C, h, w]
        return Tokens(z.flatten(2).transpose(1, 2).contiguous(), grid)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[2] != self.channels or tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"Flux2VAECodec.decode: tokens of shape {tuple(tokens.shape)}: expected "
                             f"[B, {grid[0] * grid[1]}, {self.channels}]")
        mean, std = self._stats()
        z = tokens.float().to(self.device).transpose(1, 2).reshape(tokens.shape[0], self.channels, *grid)
        latents = unpatchify(z * std + mean)
        with self._placed():
            x = self.vae.decode(latents.to(self.dtype)).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
