"""Subject masks for real photos when a manifest gives none: OpenCV GrabCut from a centre box.

DreamBench-style photos show one subject near the centre, so GrabCut initialised with a box that leaves a
margin on each side gives a usable foreground. It is optional (``focusdpo dip build --auto-masks``) and needs
the ``masks`` extra (``pip install 'focusdpo[masks]'``, i.e. opencv-python-headless).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("automatic masks need OpenCV: pip install 'focusdpo[masks]' "
                          "(opencv-python-headless), or give masks in the manifest") from e
    return cv2


def require_opencv() -> None:
    """Raise the ImportError of :func:`_cv2` (naming the extra to install) when OpenCV is missing."""
    _cv2()


def grabcut_mask(image: np.ndarray, margin: float = 0.1, iters: int = 5, seed: int = 0,
                 max_side: int | None = 192) -> np.ndarray:
    """Foreground of ``image`` by GrabCut initialised with a centre box.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        margin: fraction of each side left outside the initial box, in [0, 0.5).
        iters: GrabCut iterations (>= 1).
        seed: seed of OpenCV's RNG (GrabCut's GMM initialisation uses k-means), for reproducible masks.
        max_side: GrabCut runs on a copy whose longer side is at most this (box-downscaled), and the mask is
            brought back to full size (bilinear, threshold 0.5); None: full resolution. At 512 px GrabCut
            costs ~6 s of CPU, at 192 px ~0.8 s, with masks that differ only along edges.

    Returns:
        bool ``[H, W]``, True on the foreground: the largest connected component, holes filled (GrabCut tends
        to cut dark details such as eyes out of a subject, which would leave them outside M_prior).
    """
    if not (0 <= margin < 0.5) or iters < 1:
        raise ValueError(f"grabcut_mask: margin={margin} must be in [0, 0.5) and iters={iters} >= 1")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"grabcut_mask takes uint8 [H, W, 3], got {image.dtype} {image.shape}")
    cv2 = _cv2()
    cv2.setRNGSeed(seed)
    full_h, full_w = image.shape[:2]
    if max_side is not None and max(full_h, full_w) > max_side:
        scale = max_side / max(full_h, full_w)
        size = (max(1, round(full_w * scale)), max(1, round(full_h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    h, w = image.shape[:2]
    rect = (int(w * margin), int(h * margin), max(1, int(w * (1 - 2 * margin))), max(1, int(h * (1 - 2 * margin))))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.grabCut(bgr, mask, rect, bgd, fgd, iters, cv2.GC_INIT_WITH_RECT)
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n > 1:
        fg = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    fg = _fill_holes(cv2, fg)
    if (h, w) != (full_h, full_w):
        up = Image.fromarray(fg * 255).resize((full_w, full_h), Image.Resampling.BILINEAR)
        return np.asarray(up) > 127
    return fg.astype(bool)


def _fill_holes(cv2, fg: np.ndarray) -> np.ndarray:
    """uint8 {0, 1} mask with every background region not connected to the border set to 1."""
    h, w = fg.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = fg
    flood = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 2)
    return (padded[1:-1, 1:-1] != 2).astype(np.uint8)
