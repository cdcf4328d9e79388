"""Detail-Preserving Complexity Estimator (DPCE, DESIGN 2.4): where the fine details of an image are.

``complexity_map`` turns a batch of images into one value per token patch:

1. luminance ``L = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601 weights; a 1-channel image is used as is);
2. separable Gaussian blur with standard deviation ``sigma`` pixels, kernel radius ``ceil(3 sigma)``,
   borders padded by edge replication (``sigma = 0``: no blur);
3. quantisation to ``bins`` levels: ``q = min(floor(L * bins), bins - 1)``, so level ``i`` holds
   ``L in [i / bins, (i + 1) / bins)`` and ``L = 1`` falls in the top level;
4. the Shannon entropy (natural log) of the histogram of ``q`` over each ``patch x patch`` pixel patch,
   divided by ``log(bins)`` so the result lies in ``[0, 1]``.

A constant patch gives 0; a patch whose levels are uniformly spread gives 1 (only reachable when
``patch ** 2 >= bins``). The histogram is built with one ``scatter_add_`` over all pixels of the batch:
no Python loop over patches or pixels, memory linear in the number of pixels. The counts are whole numbers,
so the unordered (atomic) scatter on GPUs still gives a deterministic result.

Precision: half and bfloat16 inputs are computed in float32 (quantisation of a bfloat16 luminance would
move pixels between levels), float64 stays float64; the map is returned in the input's dtype.

``pool_to_tokens`` brings pixel masks to token resolution by area pooling (the fraction of each token's
patch covered by the mask), the convention every mask at token resolution follows (DESIGN 2.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BT601 = (0.299, 0.587, 0.114)


def _check_patch_grid(name: str, height: int, width: int, patch: int) -> tuple[int, int]:
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch={patch!r} is invalid: expected an int >= 1 (pixels per token side)")
    if height % patch or width % patch:
        raise ValueError(f"{name} has spatial size {height}x{width}, not divisible by patch={patch}: "
                         f"crop or resize {name} to a multiple of the token patch")
    return height // patch, width // patch


def pool_to_tokens(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Area-pool masks to token resolution.

    Args:
        masks: ``[..., H, W]`` float (or bool) in ``[0, 1]``; ``H`` and ``W`` multiples of ``patch``.
        patch: pixels per token side.

    Returns:
        ``[..., H / patch, W / patch]`` float in ``[0, 1]``: the fraction of each token's pixel patch covered
        by the mask (bool input is returned as float32, float input keeps its dtype).
    """
    if masks.dim() < 2:
        raise ValueError(f"masks has shape {tuple(masks.shape)}: expected [..., H, W]")
    h, w = _check_patch_grid("masks", masks.shape[-2], masks.shape[-1], patch)
    if not masks.is_floating_point():
        masks = masks.float()
    lead = masks.shape[:-2]
    blocks = masks.reshape(*lead, h, patch, w, patch)
    return blocks.mean(dim=(-3, -1))


def _luminance(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3 | 1, H, W]`` -> ``[B, 1, H, W]`` BT.601 luminance in the images' dtype."""
    if images.shape[1] == 1:
        return images
    lum = images[:, 0:1] * _BT601[0]
    lum.add_(images[:, 1:2], alpha=_BT601[1]).add_(images[:, 2:3], alpha=_BT601[2])
    return lum


def gaussian_blur(lum: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]`` with edge-replicated borders (``sigma = 0``: identity).

    The kernel is ``exp(-x^2 / (2 sigma^2))`` on ``x = -r..r``, ``r = ceil(3 sigma)``, normalised to sum 1.
    Written as ``2 (2r + 1)`` shifted, scaled additions rather than ``conv2d``: a one-channel convolution is
    several times slower on CPU (measured with ``benchmarks/bench_focus.py``) and no faster on GPU.
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma={sigma!r} is invalid: expected a finite value >= 0 (pixels)")
    if sigma == 0:
        return lum
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    weights = (kernel / kernel.sum()).tolist()
    height, width = lum.shape[-2:]
    padded = F.pad(lum, (radius, radius, radius, radius), mode="replicate")
    rows = padded[..., :, 0:width] * weights[0]
    for i in range(1, 2 * radius + 1):  # along x
        rows.add_(padded[..., :, i:i + width], alpha=weights[i])
    out = rows[..., 0:height, :] * weights[0]
    for i in range(1, 2 * radius + 1):  # along y
        out.add_(rows[..., i:i + height, :], alpha=weights[i])
    return out


def _validate_images(images: torch.Tensor, bins: int) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images has shape {tuple(images.shape)}: expected [B, 3, H, W] (or [B, 1, H, W])")
    if not images.is_floating_point():
        raise ValueError(f"images has dtype {images.dtype}: expected a float tensor in [0, 1] "
                         "(divide uint8 images by 255)")
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins={bins!r} is invalid: expected an int >= 2")
    if images.numel() == 0:
        raise ValueError(f"images has shape {tuple(images.shape)}: expected at least one non-empty image")
    lo, hi = (v.item() for v in torch.aminmax(images))  # min/max propagate NaN: one pass checks both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contains NaN or inf values: check the decoder or the data record")
    if lo < 0 or hi > 1:
        raise ValueError(f"images has values in [{lo:.4g}, {hi:.4g}]: expected [0, 1] "
                         "(rescale, e.g. (x + 1) / 2 for [-1, 1] images)")


def complexity_map(images: torch.Tensor, patch: int, sigma: float = 1.0, bins: int = 32) -> torch.Tensor:
    """DPCE: normalised local luminance entropy per token patch (DESIGN 2.4).

    Args:
        images: ``[B, 3, H, W]`` (or ``[B, 1, H, W]``) float in ``[0, 1]``, ``H`` and ``W`` multiples of ``patch``.
        patch: pixels per token side (FLUX: 16 pixels per packed token).
        sigma: Gaussian blur standard deviation in pixels, ``>= 0`` (0: no blur).
        bins: luminance quantisation levels, ``>= 2``.

    Returns:
        ``[B, H / patch, W / patch]`` in ``[0, 1]``, the images' dtype and device:
        ``-sum_i p_i log p_i / log(bins)`` with ``p_i`` the share of the patch's pixels at level ``i``.
    """
    _validate_images(images, bins)
    b, _, height, width = images.shape
    h, w = _check_patch_grid("images", height, width, patch)
    work = images if images.dtype == torch.float64 else images.float()
    lum = gaussian_blur(_luminance(work), sigma)[:, 0]  # [B, H, W]
    # lum >= 0 (a blur with positive weights of values in [0, 1]), so truncation is floor
    q = (lum * bins).clamp_(max=bins - 1).long()
    # patch index of every pixel, laid out as [B, h, p, w, p] -> one histogram row per (b, token)
    q = q.reshape(b, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(b * h * w, patch * patch)
    counts = torch.zeros(b * h * w, bins, dtype=work.dtype, device=images.device)
    counts.scatter_add_(1, q, torch.ones_like(q, dtype=work.dtype))
    p = counts / (patch * patch)
    # H = -sum_i p_i log p_i, with 0 log 0 = 0 (torch.special.entr)
    ent = torch.special.entr(p).sum(dim=1)
    ent = (ent / math.log(bins)).clamp_(0.0, 1.0)
    return ent.reshape(b, h, w).to(images.dtype)
