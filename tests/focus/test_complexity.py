"""DPCE (``complexity_map``) against an independent numpy implementation, plus known values.

The numpy reference below is written from DESIGN 2.4 and the module docstring only: BT.601 luminance,
Gaussian blur with radius ceil(3 sigma) and edge padding (applied as a sum of shifted copies), floor
quantisation to ``bins`` levels, a per-patch ``np.bincount`` histogram and its entropy over ``log(bins)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from focusdpo.focus import complexity_map, pool_to_tokens
from shared_data import DREAMBENCH as _SHARED

DREAMBENCH = _SHARED / "dataset"


def _np_blur(lum: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return lum
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    height, width = lum.shape
    pad = np.pad(lum, r, mode="edge")
    rows = sum(k[i] * pad[:, i:i + width] for i in range(2 * r + 1))  # blur along x
    return sum(k[i] * rows[i:i + height, :] for i in range(2 * r + 1))  # then along y


def _np_complexity(image: np.ndarray, patch: int, sigma: float, bins: int) -> np.ndarray:
    """image [3, H, W] float64 in [0, 1] -> [H/patch, W/patch] normalised patch entropies."""
    lum = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    q = np.minimum(np.floor(_np_blur(lum, sigma) * bins), bins - 1).astype(np.int64)
    h, w = q.shape[0] // patch, q.shape[1] // patch
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            counts = np.bincount(q[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].ravel(), minlength=bins)
            p = counts[counts > 0] / counts.sum()
            out[i, j] = -(p * np.log(p)).sum() / np.log(bins)
    return out


@pytest.mark.parametrize(("patch", "sigma", "bins"), [(8, 1.0, 32), (4, 0.0, 7), (16, 2.5, 16), (2, 0.6, 2)])
def test_matches_numpy_reference_on_random_images(patch: int, sigma: float, bins: int) -> None:
    gen = torch.Generator().manual_seed(patch)
    # smooth-ish random images so blur and quantisation both matter
    coarse = torch.rand(2, 3, 8, 12, generator=gen, dtype=torch.float64)
    images = torch.nn.functional.interpolate(coarse, size=(32, 48), mode="bilinear", align_corners=False)
    images = (0.7 * images + 0.3 * torch.rand(2, 3, 32, 48, generator=gen, dtype=torch.float64)).clamp(0, 1)
    got = complexity_map(images, patch, sigma=sigma, bins=bins)
    assert got.shape == (2, 32 // patch, 48 // patch) and got.dtype == torch.float64
    for b in range(2):
        want = _np_complexity(images[b].numpy(), patch, sigma, bins)
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-12)
    assert got.min() >= 0 and got.max() <= 1 and got.std() > 0.01


def _photos(n: int) -> list[np.ndarray]:
    from PIL import Image

    files = sorted(DREAMBENCH.glob("*/00.jpg"))[:n]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((256, 192), Image.BILINEAR)
        out.append(np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0)
    return out


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="DreamBench photos not present")
def test_matches_numpy_reference_on_dreambench_photos() -> None:
    photos = _photos(3)
    assert len(photos) == 3
    images = torch.from_numpy(np.stack(photos))
    got = complexity_map(images, 16, sigma=1.0, bins=32)
    for b, photo in enumerate(photos):
        np.testing.assert_allclose(got[b].numpy(), _np_complexity(photo, 16, 1.0, 32), atol=1e-12)
    # real photos have both flat and detailed regions
    assert got.min() < 0.5 < got.max()


def test_constant_image_is_zero() -> None:
    images = torch.full((2, 3, 32, 32), 0.37)
    assert torch.equal(complexity_map(images, 8), torch.zeros(2, 4, 4))


def test_two_level_checkerboard_is_log2_over_log_bins() -> None:
    # planted: every 4x4 patch holds exactly half level 3 and half level 20 of 32
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    lum = torch.where(board.bool(), torch.tensor(20.5 / 32), torch.tensor(3.5 / 32))
    images = lum.expand(1, 3, 8, 8)
    got = complexity_map(images, 4, sigma=0.0, bins=32)
    torch.testing.assert_close(got, torch.full((1, 2, 2), math.log(2) / math.log(32)))


def test_white_noise_at_bins_levels_approaches_one() -> None:
    bins = 32
    gen = torch.Generator().manual_seed(0)
    values = []
    for patch in (8, 16, 32, 64):
        levels = torch.randint(0, bins, (1, 1, 128, 128), generator=gen)
        images = ((levels + 0.5) / bins).expand(1, 3, 128, 128)
        values.append(complexity_map(images, patch, sigma=0.0, bins=bins).mean().item())
    # the plug-in entropy of n uniform samples is biased low by about (bins - 1) / (2 n)
    assert values == sorted(values)
    assert values[-1] > 0.99 and values[1] > 0.97
    assert values[0] <= math.log(64) / math.log(bins) + 1e-6  # 64 pixels cannot fill more than 64 levels


def test_blur_lowers_noise_complexity() -> None:
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert complexity_map(images, 16, sigma=2.0).mean() < complexity_map(images, 16, sigma=0.0).mean() - 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_keeps_dtype_and_matches_float64(dtype: torch.dtype) -> None:
    levels = torch.randint(0, 32, (2, 1, 32, 32), generator=torch.Generator().manual_seed(2))
    images = ((levels + 0.5) / 32).expand(2, 3, 32, 32)  # grey, mid-level: exact in every float dtype
    got = complexity_map(images.to(dtype), 8, sigma=0.0)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), complexity_map(images.double(), 8, sigma=0.0),
                               atol=4e-3, rtol=0)


def test_grayscale_input_equals_rgb_grey() -> None:
    grey = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(complexity_map(grey, 4), complexity_map(grey.expand(1, 3, 16, 16), 4))


@pytest.mark.parametrize(
    ("images", "patch", "match"),
    [
        (torch.full((1, 3, 8, 8), float("nan")), 4, "images contains NaN"),
        (torch.full((1, 3, 8, 8), 1.5), 4, r"images has values in \[1.5"),
        (torch.zeros(1, 3, 10, 8), 4, "not divisible by patch=4"),
        (torch.zeros(3, 8, 8), 4, "images has shape"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4, "images has dtype"),
        (torch.zeros(1, 3, 8, 8), 0, "patch=0"),
    ],
)
def test_bad_input_names_the_argument(images: torch.Tensor, patch: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        complexity_map(images, patch)


def test_bad_bins_and_sigma() -> None:
    with pytest.raises(ValueError, match="bins=1"):
        complexity_map(torch.zeros(1, 3, 8, 8), 4, bins=1)
    with pytest.raises(ValueError, match="sigma=-1"):
        complexity_map(torch.zeros(1, 3, 8, 8), 4, sigma=-1.0)


def test_pool_to_tokens_area_fractions() -> None:
    mask = torch.zeros(1, 4, 6)
    mask[0, :2, :3] = 1  # covers token (0, 0) fully and half of token (0, 1)
    want = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(pool_to_tokens(mask, 2), want)
    torch.testing.assert_close(pool_to_tokens(mask.bool(), 2), want)
    assert pool_to_tokens(mask.double(), 2).dtype == torch.float64
    # any leading dims; total area is preserved
    masks = torch.rand(2, 3, 8, 8).round()
    pooled = pool_to_tokens(masks, 4)
    assert pooled.shape == (2, 3, 2, 2)
    torch.testing.assert_close(pooled.sum(dim=(-2, -1)) * 16, masks.sum(dim=(-2, -1)))
    with pytest.raises(ValueError, match="masks has spatial size 8x7"):
        pool_to_tokens(torch.zeros(8, 7), 2)
