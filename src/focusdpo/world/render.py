"""Rasterising subjects: silhouettes, patterns, detail marks and backgrounds, all with hard edges.

A subject is drawn in its own frame: pixel centres ``(x + 0.5, y + 0.5)`` are moved to the subject centre,
rotated by ``-angle`` (giving ``du, dv`` in pixels) and divided by half the size (giving ``un, vn``; every
silhouette spans ``[-1, 1]^2``). A pixel belongs to the subject iff its centre is inside the silhouette, so
masks are exact: no anti-aliasing, no soft edge. Patterns and marks are measured in *pattern units* of
``unit`` pixels (1 at the default 32 px scene / 16 px reference, 2 at 64 / 32), so their period in pixels
does not depend on the subject size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from focusdpo.world.subjects import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    MARK_COLOURS,
    PATTERNS,
    Identity,
    mark_colour,
)


@dataclass(frozen=True)
class Placement:
    """Where one subject stands: centre ``(cx, cy)`` and ``size`` (side of its bounding box) as fractions of
    the canvas side, ``angle`` in degrees (counter-clockwise), ``layer`` = draw order (higher is in front)."""

    cx: float
    cy: float
    size: float
    angle: float = 0.0
    layer: int = 0


def shape_mask(cls: str, un: np.ndarray, vn: np.ndarray) -> np.ndarray:
    """Silhouette of class ``cls`` at normalised coordinates ``un, vn`` (any shape) -> bool, same shape."""
    inside = (np.abs(un) <= 1) & (np.abs(vn) <= 1)
    if cls == "ball":
        return un**2 + vn**2 <= 1
    if cls == "box":
        return inside
    if cls == "cone":
        return inside & (np.abs(un) <= (vn + 1) / 2)
    if cls == "gem":
        return np.abs(un) + np.abs(vn) <= 1
    if cls == "cross":
        return inside & ((np.abs(un) <= 0.36) | (np.abs(vn) <= 0.36))
    if cls == "ring":
        r2 = un**2 + vn**2
        return (r2 <= 1) & (r2 >= 0.4**2)
    raise ValueError(f"unknown subject class {cls!r}: expected one of {', '.join(CLASSES)}")


def pattern_mask(pattern: str, du: np.ndarray, dv: np.ndarray, unit: float) -> np.ndarray:
    """Pixels of the pattern colour at subject-frame pixel offsets ``du, dv`` -> bool, same shape."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}: expected one of {', '.join(PATTERNS)}")
    period = PATTERNS[pattern]
    iu, iv = np.floor(du / unit).astype(np.int64), np.floor(dv / unit).astype(np.int64)
    if pattern == "stripes":
        return iv % period == 0
    if pattern == "bands":
        return iu % period == 0
    if pattern == "dots":
        return (iu % period < 2) & (iv % period < 2)
    if pattern == "diagonal":
        return np.floor((du + dv) / unit).astype(np.int64) % period == 0
    return (iu % period == 0) | (iv % period == 0)  # grid


def mark_mask(detail: str, a: np.ndarray, b: np.ndarray, unit: float) -> np.ndarray:
    """Pixels of the detail mark at pixel offsets ``a, b`` from its spot -> bool: 2x2, 3x1 or 1x3 units."""
    half_w, half_h = {"dot": (1.0, 1.0), "hbar": (1.5, 0.5), "vbar": (0.5, 1.5)}.get(detail, (None, None))
    if half_w is None:
        raise ValueError(f"unknown detail {detail!r}: expected one of dot, hbar, vbar")
    # Half-open intervals: exactly 2 or 3 (or 1) units of pixel centres, even when the spot lies on a pixel edge.
    return (a >= -half_w * unit) & (a < half_w * unit) & (b >= -half_h * unit) & (b < half_h * unit)


def subject_frame(placement: Placement, side: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Subject-frame pixel offsets ``(du, dv)`` of every pixel of a ``side`` x ``side`` canvas ([side, side]
    float each) and the half size in pixels."""
    coords = np.arange(side) + 0.5
    dx = coords[None, :] - placement.cx * side
    dy = coords[:, None] - placement.cy * side
    theta = np.deg2rad(placement.angle)
    c, s = np.cos(theta), np.sin(theta)
    du = c * dx - s * dy
    dv = s * dx + c * dy
    return du, dv, placement.size * side / 2


def draw_subject(identity: Identity, placement: Placement, side: int, unit: float) -> tuple[np.ndarray, np.ndarray]:
    """One subject on a transparent ``side`` x ``side`` canvas.

    Returns ``(rgb uint8 [side, side, 3], mask bool [side, side])``; ``rgb`` is only meaningful inside ``mask``.
    """
    du, dv, half = subject_frame(placement, side)
    shape = shape_mask(identity.cls, du / half, dv / half)
    spot_u, spot_v = CLASSES[identity.cls]
    mark = shape & mark_mask(identity.detail, du - spot_u * half, dv - spot_v * half, unit)
    rgb = np.empty((side, side, 3), dtype=np.uint8)
    rgb[:] = COLOURS[identity.body]
    rgb[pattern_mask(identity.pattern, du, dv, unit)] = COLOURS[identity.pattern_colour]
    rgb[mark] = MARK_COLOURS[mark_colour(identity.body)]
    return rgb, shape


def background_image(name: str, side: int, seed: int) -> np.ndarray:
    """The textured background ``name`` ([side, side, 3] uint8): its palette colour plus a fixed +-6 luminance
    texture that depends only on ``(seed, name, side)``."""
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}: expected one of {', '.join(BACKGROUNDS)}")
    rng = np.random.default_rng([seed, list(BACKGROUNDS).index(name), side])
    noise = rng.integers(-6, 7, size=(side, side, 1))
    return np.clip(np.asarray(BACKGROUNDS[name])[None, None, :] + noise, 0, 255).astype(np.uint8)


def composite(canvas: np.ndarray, identities: list[Identity], placements: list[Placement],
              unit: float) -> np.ndarray:
    """Draw subjects onto ``canvas`` ([S, S, 3] uint8, modified in place) in the order of ``placement.layer``.

    Returns the visible masks ``bool [K, S, S]`` in the order of ``identities``: disjoint, occlusion resolved
    by the draw order.
    """
    if len(identities) != len(placements):
        raise ValueError(f"identities ({len(identities)}) and placements ({len(placements)}) must have the same "
                         "length: one placement per subject")
    side = canvas.shape[0]
    masks = np.zeros((len(identities), side, side), dtype=bool)
    for k in sorted(range(len(identities)), key=lambda i: placements[i].layer):
        rgb, shape = draw_subject(identities[k], placements[k], side, unit)
        canvas[shape] = rgb[shape]
        masks[:, shape] = False
        masks[k] = shape
    return masks
