"""Subject masks for real photos when a manifest gives none: OpenCV GrabCut, for one subject or K.

This is the CPU backend of ``focusdpo dip build --auto-masks`` (the promptable detector + segmenter of
:mod:`focusdpo.data.mask_models` is the other; :mod:`focusdpo.data.automask` chooses). It needs the ``masks``
extra (``pip install 'focusdpo[masks]'``, i.e. opencv-python-headless).

- One subject (:func:`grabcut_mask`): DreamBench-style photos show one subject near the centre, so GrabCut
  initialised with a box that leaves a margin on each side gives a usable foreground.
- K subjects (:func:`grabcut_subjects`), boxes first, masks second, then the order:

  1. ``boxes`` given (the manifest's ``target_boxes``): GrabCut inside each box, in the boxes' order.
  2. an image whose sides are in the ratio K:1 (within 10 %) is taken as a side-by-side composition of K
     square photos: ``strips`` (4.) directly (whole-image GrabCut on the DreamBench dog + can tiles kept the
     can and the dog's mouth only).
  3. else ``components``: GrabCut of the whole image (margin box); when the K largest connected components
     of its foreground each cover ``min_area`` of the image and together hold ``COMPONENT_SHARE`` (90 %) of
     the foreground, they are the subjects (separated subjects on a plain background; a subject GrabCut broke
     into pieces fails the share).
  4. else ``strips``: the image is split into K equal strips along its longer side and each strip is masked
     as a one-subject photo (centre box with a margin): the layout of a side-by-side composition, the usual
     way multi-subject training images are assembled from single-subject photos (UNO, DreamBench pairs).

  Without boxes the masks' order is unknown: :func:`colour_order` assigns them to the references by the
  colour histograms of the masked pixels (the permutation with the highest total histogram intersection).
  Subjects that look alike in colour (two brown dogs) can be swapped: give ``target_boxes`` or
  ``target_masks`` for them.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

# The K largest foreground components are taken as the K subjects only when they hold this share of it.
COMPONENT_SHARE = 0.9
# An image whose longer side is K times its shorter one, within this relative tolerance, is a composition of K
# square tiles.
COMPOSITION_TOLERANCE = 0.1


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
                 max_side: int | None = 192, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Foreground of ``image`` by GrabCut initialised with a centre box (or ``box``).

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        margin: fraction of each side left outside the initial box, in [0, 0.5).
        iters: GrabCut iterations (>= 1).
        seed: seed of OpenCV's RNG (GrabCut's GMM initialisation uses k-means), for reproducible masks.
        max_side: GrabCut runs on a copy whose longer side is at most this (box-downscaled), and the mask is
            brought back to full size (bilinear, threshold 0.5); None: full resolution. At 512 px GrabCut
            costs ~6 s of CPU, at 192 px ~0.8 s, with masks that differ only along edges.
        box: ``(x0, y0, x1, y1)`` full-resolution pixels of the initial box instead of the margin box; the
            mask is kept inside it.

    Returns:
        bool ``[H, W]``, True on the foreground: the largest connected component, holes filled (GrabCut tends
        to cut dark details such as eyes out of a subject, which would leave them outside M_prior).
    """
    comps = _grabcut_components(image, margin, iters, seed, max_side, box)
    if not comps:
        return np.zeros(image.shape[:2], bool)
    return comps[0]


def _grabcut_components(image: np.ndarray, margin: float, iters: int, seed: int, max_side: int | None,
                        box: tuple[int, int, int, int] | None = None) -> list[np.ndarray]:
    """GrabCut's foreground split into 8-connected components, largest first, each with its holes filled and
    brought back to full size: a list of bool ``[H, W]``."""
    if not (0 <= margin < 0.5) or iters < 1:
        raise ValueError(f"grabcut_mask: margin={margin} must be in [0, 0.5) and iters={iters} >= 1")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"grabcut_mask takes uint8 [H, W, 3], got {image.dtype} {image.shape}")
    cv2 = _cv2()
    cv2.setRNGSeed(seed)
    full_h, full_w = image.shape[:2]
    scale = 1.0
    if max_side is not None and max(full_h, full_w) > max_side:
        scale = max_side / max(full_h, full_w)
        size = (max(1, round(full_w * scale)), max(1, round(full_h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    h, w = image.shape[:2]
    rect = _rect(box, scale, w, h) if box is not None else (
        int(w * margin), int(h * margin), max(1, int(w * (1 - 2 * margin))), max(1, int(h * (1 - 2 * margin))))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.grabCut(bgr, mask, rect, bgd, fgd, iters, cv2.GC_INIT_WITH_RECT)
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")
    out = []
    for label in order:
        comp = _fill_holes(cv2, (labels == label).astype(np.uint8))
        if (h, w) != (full_h, full_w):
            up = Image.fromarray(comp * 255).resize((full_w, full_h), Image.Resampling.BILINEAR)
            comp = np.asarray(up) > 127
        out.append(comp.astype(bool))
    return out


def _rect(box: tuple[int, int, int, int], scale: float, w: int, h: int) -> tuple[int, int, int, int]:
    """OpenCV's ``(x, y, width, height)`` of a full-resolution ``(x0, y0, x1, y1)`` box on the working copy."""
    x0, y0 = min(max(0, int(box[0] * scale)), w - 1), min(max(0, int(box[1] * scale)), h - 1)
    x1, y1 = min(w, max(x0 + 1, round(box[2] * scale))), min(h, max(y0 + 1, round(box[3] * scale)))
    return x0, y0, x1 - x0, y1 - y0


def grabcut_subjects(image: np.ndarray, k: int, boxes: list[tuple[int, int, int, int]] | None = None,
                     min_area: float = 0.01, margin: float = 0.1, seed: int = 0,
                     max_side: int | None = 192) -> tuple[np.ndarray, str]:
    """K subject masks of ``image`` by GrabCut (the module docstring gives the three layouts).

    Args:
        image: uint8 ``[H, W, 3]``.
        k: number of subjects (>= 1).
        boxes: K ``(x0, y0, x1, y1)`` pixel boxes, one per subject, or None.
        min_area: smallest component, as a fraction of the image, that counts as a subject.

    Returns:
        ``(masks, layout)``: bool ``[K, H, W]`` (in the boxes' order when given, else in no particular order:
        see :func:`colour_order`; a mask can be empty when GrabCut found nothing in its box), and the layout
        used: ``boxes``, ``components`` or ``strips``.
    """
    if k < 1:
        raise ValueError(f"grabcut_subjects: k={k} must be >= 1")
    h, w = image.shape[:2]
    if boxes is not None:
        if len(boxes) != k:
            raise ValueError(f"grabcut_subjects: {len(boxes)} boxes for k={k} subjects; give one box per subject")
        masks = [grabcut_mask(image, seed=seed, max_side=max_side, box=b) for b in boxes]
        return _keep_in_boxes(np.stack(masks), boxes), "boxes"
    if k > 1 and abs(max(h, w) / min(h, w) / k - 1) > COMPOSITION_TOLERANCE:  # not K square tiles in a row
        comps = _grabcut_components(image, margin, 5, seed, max_side)
        areas = [float(c.mean()) for c in comps]
        if len(comps) >= k and areas[k - 1] >= min_area and sum(areas[:k]) >= COMPONENT_SHARE * sum(areas):
            return np.stack(comps[:k]), "components"
    masks = np.zeros((k, h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(strip_boxes(h, w, k)):
        # each strip as its own photo (centre box with a margin): GrabCut over the whole image with the strip as
        # the box also models the other subjects as background and lost a corgi next to a red backpack
        masks[i, y0:y1, x0:x1] = grabcut_mask(np.ascontiguousarray(image[y0:y1, x0:x1]), margin=margin, seed=seed,
                                              max_side=max_side)
    return masks, "strips"


def strip_boxes(h: int, w: int, k: int) -> list[tuple[int, int, int, int]]:
    """K equal strips ``(x0, y0, x1, y1)`` along the longer side of an ``h x w`` image, left to right (or top
    to bottom)."""
    if w >= h:
        return [(i * w // k, 0, (i + 1) * w // k, h) for i in range(k)]
    return [(0, i * h // k, w, (i + 1) * h // k) for i in range(k)]


def _keep_in_boxes(masks: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """``masks`` bool [K, H, W] with every pixel outside its own box cleared."""
    out = np.zeros_like(masks)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        out[i, y0:int(np.ceil(y1)), x0:int(np.ceil(x1))] = masks[i, y0:int(np.ceil(y1)), x0:int(np.ceil(x1))]
    return out


def colour_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """Normalised joint RGB histogram ``[bins**3]`` (sums to 1) of uint8 pixels ``[P, 3]``; uniform when P = 0."""
    if len(pixels) == 0:
        return np.full(bins ** 3, 1.0 / bins ** 3)
    q = (pixels.astype(np.int64) * bins) // 256
    hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3).astype(np.float64)
    return hist / hist.sum()


def colour_order(image: np.ndarray, masks: np.ndarray, references: list[np.ndarray],
                 ref_masks: list[np.ndarray], allowed: np.ndarray | None = None) -> list[int]:
    """Which mask is which reference: ``order[k]`` = the index in ``masks`` of reference k's subject.

    The permutation maximising the summed histogram intersection between each reference's masked pixels and
    its mask's pixels in ``image`` (exhaustive over permutations, K <= 7; greedy beyond). ``allowed``: bool
    ``[K, K]``, ``allowed[i, k]`` = mask i may be reference k (e.g. only among detections of the same class);
    None: any.
    """
    k = len(references)
    if masks.shape[0] != k:
        raise ValueError(f"colour_order: {masks.shape[0]} masks for {k} references")
    mh = [colour_histogram(image[m]) for m in masks]
    rh = [colour_histogram(r[rm]) for r, rm in zip(references, ref_masks, strict=True)]
    sim = np.array([[np.minimum(a, b).sum() for b in rh] for a in mh])  # [mask, reference]
    if allowed is not None:
        sim = np.where(allowed, sim, -np.inf)
    if k <= 7:
        best = max(itertools.permutations(range(k)), key=lambda p: sum(sim[p[j], j] for j in range(k)))
        return list(best)
    order, free = [-1] * k, set(range(k))
    for i, j in sorted(np.ndindex(k, k), key=lambda ij: -sim[ij]):
        if order[j] < 0 and i in free:
            order[j] = i
            free.discard(i)
    return order


def _fill_holes(cv2, fg: np.ndarray) -> np.ndarray:
    """uint8 {0, 1} mask with every background region not connected to the border set to 1."""
    h, w = fg.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = fg
    flood = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 2)
    return (padded[1:-1, 1:-1] != 2).astype(np.uint8)
