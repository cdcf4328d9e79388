"""FLUX VAE codec: images in ``[0, 1]`` <-> 2x2-packed, normalised VAE latent tokens (the ``Codec`` protocol).

FLUX encodes an image with a diffusers :class:`~diffusers.AutoencoderKL` (16 latent channels, 8x spatial
compression), normalises the latents with the VAE's ``shift_factor`` and ``scaling_factor``
(``z = (mean - shift) * scale``) and packs each 2x2 latent patch into one token of ``4 * 16 = 64`` channels,
so one token covers ``16 x 16`` pixels. Token channels are ordered ``(c, dy, dx)`` and tokens are row-major,
exactly as ``FluxPipeline._pack_latents``: a LoRA trained on our tokens therefore works in the pipeline.

Encoding takes the mode (mean) of the VAE posterior rather than a sample: the result is a deterministic
function of the image, which is what makes latents cacheable (:class:`LatentCache`), and the posterior
std of the FLUX VAE is small next to the flow-matching noise.

Offloading (``offload=True``): the frozen VAE stays on the CPU and visits the execution device only for the
duration of one ``encode``/``decode`` call, trading transfer time for accelerator memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from focusdpo.backbones.base import Tokens


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H', W']`` latents -> ``[B, (H'/2)(W'/2), 4C]`` tokens, channels ``(c, dy, dx)``, row-major."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent grid {h}x{w} must be even on both sides to pack 2x2 patches")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, h*w, 4C]`` on ``grid=(h, w)`` -> ``[B, C, 2h, 2w]``."""
    b, n, c4 = tokens.shape
    h, w = grid
    if n != h * w or c4 % 4:
        raise ValueError(f"unpack_latents: tokens of shape {tuple(tokens.shape)} do not fit grid {grid}: "
                         f"expected [B, {h * w}, 4C]")
    x = tokens.reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


class FluxVAECodec:
    """The FLUX VAE as a :class:`~focusdpo.backbones.base.Codec`.

    ``encode``: ``float [B, 3, H, W]`` in ``[0, 1]`` -> ``Tokens [B, (H/p)(W/p), 4 * latent_channels]`` of
    normalised latents (about unit variance), ``p = 2 * 2**(len(block_out_channels) - 1)`` (16 for FLUX).
    ``decode``: the inverse, images clamped to ``[0, 1]``. Tokens and images are float32 whatever the VAE's dtype,
    so that clean latents, noise and the velocity target keep full precision (the transformer casts its input).
    The VAE is frozen (``requires_grad`` off, eval mode).
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device | str | None = None, offload: bool = False) -> None:
        cfg = vae.config
        for key in ("latent_channels", "block_out_channels", "scaling_factor"):
            if getattr(cfg, key, None) is None:
                raise ValueError(f"FluxVAECodec: the VAE config has no {key!r}: pass a diffusers AutoencoderKL")
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.vae_scale = 2 ** (len(cfg.block_out_channels) - 1)
        self.patch = 2 * self.vae_scale
        self.offload = offload
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        self.vae.to("cpu" if offload else self.device)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = "vae", dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, offload: bool = False) -> FluxVAECodec:
        """Load ``AutoencoderKL`` (safetensors only) from a local diffusers folder or hub id, ``subfolder`` in it."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True)
        return cls(vae, device=device or "cpu", offload=offload)

    @property
    def channels(self) -> int:
        return 4 * self.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device: torch.device | str) -> FluxVAECodec:
        """Set the execution device (the weights follow unless offloading)."""
        self.device = torch.device(device)
        if not self.offload:
            self.vae.to(self.device)
        return self

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = size
        if h % self.patch or w % self.patch or h < 1 or w < 1:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of the VAE token size {self.patch} "
                             f"(VAE downsampling {self.vae_scale} x 2x2 packing): resize or crop the image")
        return h // self.patch, w // self.patch

    @contextmanager
    def _placed(self) -> Iterator[None]:
        if self.offload:
            self.vae.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                self.vae.to("cpu")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Tokens:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FluxVAECodec.encode: images of shape {tuple(images.shape)}: expected [B, 3, H, W]")
        grid = self.token_grid(tuple(images.shape[-2:]))
        with self._placed():
            x = (images.to(self.device, self.dtype) * 2.0 - 1.0)
            mean = self.vae.encode(x).latent_dist.mode()
        z = (mean.float() - self.shift) * self.scale  # FLUX latent normalisation, in fp32 whatever the VAE dtype
        return Tokens(pack_latents(z), grid)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[2] != self.channels:
            raise ValueError(f"FluxVAECodec.decode: tokens of shape {tuple(tokens.shape)}: expected "
                             f"[B, {grid[0] * grid[1]}, {self.channels}]")
        z = unpack_latents(tokens, grid) / self.scale + self.shift
        with self._placed():
            x = self.vae.decode(z.to(self.device, self.dtype)).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def fingerprint(self) -> str:
        """A short hash of the VAE config, dtype and weights: latents cached under it match this VAE only."""
        h = hashlib.blake2b(digest_size=8)
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}  # not paths/versions
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        h.update(str(self.dtype).encode())
        for name, p in sorted(self.vae.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())  # a sample of every tensor
        return h.hexdigest()


class LatentCache:
    """A codec wrapper that caches latent tokens on disk, addressed by image content.

    Each image of a batch is hashed (blake2b of its float32 pixels and size); a hit loads
    ``<root>/<codec fingerprint>/<hash>.safetensors``, a miss encodes and writes it. Content addressing
    means a hit holds the latents of the same pixels under the same VAE (its config, dtype and a sample of
    every weight tensor), up to hash collisions; the trainer needs no record ids. Point ``root`` at
    ``<dataset>/latents`` to keep the cache with the dataset.
    ``hits`` and ``misses`` count images.
    """

    def __init__(self, codec: FluxVAECodec, root: str | Path) -> None:
        self.codec = codec
        self.dir = Path(root).expanduser() / codec.fingerprint()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.patch = codec.patch
        self.hits = 0
        self.misses = 0

    @property
    def channels(self) -> int:
        return self.codec.channels

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.codec.token_grid(size)

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.codec.decode(tokens, grid)

    def to(self, device: torch.device | str) -> LatentCache:
        self.codec.to(device)
        return self

    @staticmethod
    def key(image: torch.Tensor) -> str:
        """Content hash of one ``[3, H, W]`` image."""
        x = image.detach().to("cpu", torch.float32).contiguous()
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(x.shape)).encode())
        h.update(x.numpy().tobytes())
        return h.hexdigest()

    def encode(self, images: torch.Tensor) -> Tokens:
        grid = self.codec.token_grid(tuple(images.shape[-2:]))
        keys = [self.key(img) for img in images]
        out: list[torch.Tensor | None] = [None] * len(keys)
        for i, k in enumerate(keys):
            path = self.dir / f"{k}.safetensors"
            if path.exists():
                out[i] = load_file(path)["tokens"]
        missing = [i for i, t in enumerate(out) if t is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self.codec.encode(images[missing]).tokens
            for j, i in enumerate(missing):
                out[i] = fresh[j].detach().cpu().contiguous()
                tmp = self.dir / f"{keys[i]}.{os.getpid()}.tmp"  # one writer per file, even across processes
                save_file({"tokens": out[i]}, tmp)
                tmp.replace(self.dir / f"{keys[i]}.safetensors")  # atomic: a killed run leaves no torn file
        return Tokens(torch.stack(out).to(self.codec.device), grid)


def cache_dataset_latents(cache: LatentCache, dataset: Sequence[dict], batch_size: int = 8,
                          progress: Callable[[int, int], None] | None = None,
                          prompts: list[str] | None = None) -> tuple[int, int]:
    """Encode every positive, negative and reference image of ``dataset`` into ``cache`` ahead of training.

    dataset: items with ``"positive"``, ``"negative"`` (``float [3, H, W]`` in [0, 1]) and ``"references"``
    (a list of ``[3, h, w]``), e.g. :class:`focusdpo.data.dataset.DipDataset`. Images of one size are encoded
    together, ``batch_size`` at a time. ``progress(done, total)`` is called after each record; ``prompts``, if
    given, receives each item's ``"prompt"`` (one pass over the data for the text cache too). Returns
    ``(hits, misses)``: images already cached and images encoded now.
    """
    hits, misses = cache.hits, cache.misses
    pending: dict[tuple[int, int], list[torch.Tensor]] = {}

    def flush(size: tuple[int, int]) -> None:
        if pending.get(size):
            cache.encode(torch.stack(pending.pop(size)))

    for i in range(len(dataset)):
        item = dataset[i]
        for img in [item["positive"], item["negative"], *item["references"]]:
            size = tuple(img.shape[-2:])
            pending.setdefault(size, []).append(img)
            if len(pending[size]) >= batch_size:
                flush(size)
        if prompts is not None:
            prompts.append(item["prompt"])
        if progress is not None:
            progress(i + 1, len(dataset))
    for size in list(pending):
        flush(size)
    return cache.hits - hits, cache.misses - misses
