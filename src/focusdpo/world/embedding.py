"""A download-free identity embedding of toy-world crops: the toy benchmark's stand-in for DINO (issue 16 point 3).

The identity-confusion metric (:mod:`focusdpo.judges`) embeds each subject region and each reference and assigns
them by similarity; on DreamBench the embedder is DINO, which sees shape, colour and texture. A colour histogram
alone (:func:`focusdpo.judges.colour_embedder`) sees only colours, while most of the toy world's leakage is a
borrowed silhouette, pattern or mark. :func:`subject_embedder` reads every kind of attribute from pixels, with no
knowledge of the world's attribute names or palette:

1. the subject: pixels further than 30 (RGB) from the crop's border median (the plain or textured background),
   then the largest 4-connected component of them (drops a neighbour's fragment and stray pixels); its bounding
   box, made square around its centre, is the subject's frame;
2. ``colour``: the joint RGB histogram (``bins`` per channel) of the subject's pixels;
3. ``shape``: the subject's mask resampled to ``grid x grid`` cells of its frame (area average), centred to
   ``2 m - 1`` so that cosine compares silhouettes, not their sizes;
4. ``texture``: for each of 8 offsets (1 and 2 px; horizontal, vertical, both diagonals), the share of subject
   pixel pairs at that offset whose quantised colours differ, minus their mean over the offsets (the
   direction and period of stripes, bands, diagonals, dots and grids, independent of the colours), then that
   mean and a small constant (a flat subject still has a direction);
5. ``mark``: the presence of near-white and near-black pixels (10 x their share of the subject, at most 1),
   their centroids in the frame (``[-1, 1]``) and elongation (``(w - h) / (w + h)`` of their box, twice), both
   times the presence, and ``1 - presence`` (no mark): the detail mark, its kind and where it sits.

Each block is scaled to unit length and weighted (``weights``), so the cosine of two embeddings is the weighted
mean of the blocks' cosines. The default weights were chosen on ground-truth renders of *training-split*
identities (``experiments/confusion_agreement.py calibrate``), never on the held-out evaluation scenes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from focusdpo.world import Scene, World
from focusdpo.world.metrics import connected_components

BLOCKS = ("colour", "shape", "texture", "mark")
DEFAULT_WEIGHTS: dict[str, float] = {"colour": 1.0, "shape": 1.0, "texture": 1.0, "mark": 1.0}
_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0), (2, 2), (2, -2))


def subject_mask(image: np.ndarray, threshold: float = 30.0) -> np.ndarray:
    """bool ``[H, W]``: the largest 4-connected component of the pixels further than ``threshold`` from the
    median colour of the crop's border (all False when there is none)."""
    im = np.asarray(image).astype(np.int64)
    border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
    bg = np.median(border, axis=0)
    fg = np.abs(im - bg).sum(-1) > threshold
    if not fg.any():
        return fg
    return connected_components(fg)[0]


def _frame(mask: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    return cy, cx, float(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))


def _shape(mask: np.ndarray, grid: int) -> np.ndarray:
    cy, cx, size = _frame(mask)
    sub = 4  # sub-samples per cell side: an area average that is exact enough at 8-16 px subjects
    t = (np.arange(grid * sub) + 0.5) / (grid * sub) - 0.5
    ys = np.clip(np.floor(cy + t * size).astype(int), -1, mask.shape[0])
    xs = np.clip(np.floor(cx + t * size).astype(int), -1, mask.shape[1])
    padded = np.pad(mask, 1)
    samples = padded[ys[:, None] + 1, xs[None, :] + 1].astype(np.float64)
    cells = samples.reshape(grid, sub, grid, sub).mean((1, 3))
    return (2 * cells - 1).ravel()


def _texture(image: np.ndarray, mask: np.ndarray, bins: int) -> np.ndarray:
    q = (image.astype(np.int64) * bins) // 256
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    h, w = mask.shape
    out = []
    for dy, dx in _OFFSETS:
        a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        b = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
        both = mask[a] & mask[b]
        out.append(float((code[a] != code[b])[both].mean()) if both.any() else 0.0)
    v = np.asarray(out)
    return np.concatenate([v - v.mean(), [v.mean(), 0.05]])  # the constant keeps a flat subject's block non-zero


def _mark(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    im = image.astype(np.int64)
    cy, cx, size = _frame(mask)
    out = []
    for light in (True, False):
        sel = mask & ((im.min(-1) > 215) if light else (im.max(-1) < 50))
        share = float(sel.sum() / mask.sum())
        pos, aniso = [0.0, 0.0], 0.0
        if sel.any():
            ys, xs = np.nonzero(sel)
            pos = [(ys.mean() + 0.5 - cy) / (size / 2), (xs.mean() + 0.5 - cx) / (size / 2)]
            wx, wy = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            aniso = (wx - wy) / (wx + wy)  # hbar > 0, vbar < 0, dot 0
        presence = min(1.0, 10 * share)  # a 2-3 px mark is 2-6 % of a subject: present = about 1
        out += [presence, presence * pos[0], presence * pos[1], 2 * presence * aniso]
    return np.asarray([*out, 1.0 - max(out[0], out[4])])  # the last entry: "no mark"


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 1e-12 else v


def subject_features(image: np.ndarray, bins: int = 4, grid: int = 8) -> dict[str, np.ndarray]:
    """The four unit-length blocks of one crop (``uint8 [h, w, 3]``); zero vectors when no subject is found."""
    im = np.asarray(image)
    mask = subject_mask(im)
    if mask.sum() < 2:
        return {"colour": np.zeros(bins ** 3), "shape": np.zeros(grid * grid), "texture": np.zeros(len(_OFFSETS) + 2),
                "mark": np.zeros(9)}
    px = im[mask].astype(np.int64) * bins // 256
    hist = np.bincount((px[:, 0] * bins + px[:, 1]) * bins + px[:, 2], minlength=bins ** 3).astype(np.float64)
    return {"colour": _unit(hist), "shape": _unit(_shape(mask, grid)), "texture": _unit(_texture(im, mask, bins)),
            "mark": _unit(_mark(im, mask))}


def subject_embedder(weights: Mapping[str, float] | None = None, bins: int = 4, grid: int = 8
                     ) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """An :data:`focusdpo.judges.Embed` (``list of uint8 [h, w, 3] -> [n, D]``) that sees colour, silhouette,
    pattern and mark (module docstring). ``weights``: per block (missing blocks: 0)."""
    w = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = set(w) - set(BLOCKS)
    if unknown:
        raise ValueError(f"unknown embedding blocks {sorted(unknown)}: expected some of {', '.join(BLOCKS)}")

    def embed(images: Sequence[np.ndarray]) -> np.ndarray:
        rows = []
        for im in images:
            f = subject_features(im, bins, grid)
            rows.append(np.concatenate([np.sqrt(max(w.get(b, 0.0), 0.0)) * f[b] for b in BLOCKS]))
        return np.stack(rows)
    return embed


LEAK_ATTRIBUTES = ("class", "body", "pattern", "detail")


def plant_leak(world: World, scene: Scene, target: int, donor: int, attributes: Sequence[str]) -> Scene:
    """``scene`` re-rendered with subject ``target`` carrying ``donor``'s ``attributes`` (some of
    :data:`LEAK_ATTRIBUTES`), everything else unchanged: a planted leak whose ground truth is known. The prompt,
    references and identities (what was *asked*) stay the scene's; ``image`` and ``masks`` are the new render.
    A copied body colour equal to the target's pattern colour takes the donor's pattern colour too (a pattern in
    its body's colour would vanish)."""
    from dataclasses import replace

    unknown = set(attributes) - set(LEAK_ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown leak attributes {sorted(unknown)}: expected some of {', '.join(LEAK_ATTRIBUTES)}")
    me, other = scene.identities[target], scene.identities[donor]
    field = {"class": "cls", "body": "body", "pattern": "pattern", "detail": "detail"}
    changed = replace(me, **{field[a]: getattr(other, field[a]) for a in attributes})
    if changed.body == changed.pattern_colour:
        changed = replace(changed, pattern_colour=other.pattern_colour if other.pattern_colour != changed.body
                          else me.body)
    drawn = list(scene.identities)
    drawn[target] = changed
    image, masks = world.render_scene(drawn, scene.placements, scene.background)
    return replace(scene, image=image, masks=masks)
