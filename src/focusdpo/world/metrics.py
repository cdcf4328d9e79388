"""Ground-truth toy metrics of the synthetic world: fidelity, leakage and prompt following (DESIGN 4, 6).

A generated image has no masks, so each subject is *located* from the prompt's layout and *read* from pixels:

1. foreground = pixels that do not look like the scene's background (its colour as rendered is estimated
   around the known palette colour; see :func:`label_pixels`); each gets the nearest palette colour among
   the subject colours and the two mark colours;
2. the image is cut into vertical strips at the midpoints between the slot centres of the prompt's layout;
   a subject's region is the largest 4-connected foreground component of its slot's strip;
3. the class is the silhouette template (every class, a few sizes and shifts around the region's bounding box)
   with the highest IoU; the subject's *core* is region AND best template, which drops a neighbour's pixels;
4. body colour = most frequent subject colour of the core, pattern colour = the second one (``"none"`` below
   8%); pattern = the pattern whose best phase explains the pattern-colour layout best; detail = the mark
   template (dot/hbar/vbar, small shifts) with the best IoU against the black/white pixels around the subject
   class's mark spot (``"none"`` below IoU 0.5).

Fidelity of a subject: the share of its own attributes (class, body, pattern, pattern_colour, detail) read
back correctly. Leakage of a subject: the share of the *other* subjects' distinguishing attributes found in
its region: their class, their pattern, their detail, or their colour (read as body colour, covering >= 20% of
the core while not one of the subject's own colours, or a core mean colour closer to the other subject's
colour signature than to its own; the signature is the mean colour of a canonical render, and the test is used
only when the two signatures are >= 40 apart in RGB: on ground-truth renders a subject's mean strays from its
signature by up to ~50 (pattern phase, occlusion), but never past the midpoint to a signature >= 40 away).
Chance leakage and transfer: a subject drawn with a wrong attribute shows *some* other value, and that value
is another subject's by chance as often as it is any identity's. ``leakage_chance`` is the leakage the same
reading shows toward identities not in the scene (:func:`chance_leakage`, ``CHANCE_DECOYS`` fixed decoys, the
same attributes as the real leakage); ``transfer = leakage - leakage_chance`` is what the subjects in the scene
carried over. On ground-truth renders both are ~0; on the tiny base's generated images about three quarters of
the leakage is chance (docs/results.md, "Identity confusion on the toy benchmark").
Prompt following: count (subjects found == subjects asked), classes (the multiset of read classes equals the
prompt's nouns) and positions (share of slots holding the class the prompt puts there).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from focusdpo.world import Identity, Placement, Scene, World
from focusdpo.world.prompts import SIZES, slot_centre
from focusdpo.world.render import draw_subject, mark_mask, pattern_mask, shape_mask
from focusdpo.world.subjects import BACKGROUNDS, CLASSES, COLOURS, DETAILS, MARK_COLOURS, PATTERNS

FIDELITY_ATTRS = ("class", "body", "pattern", "pattern_colour", "detail")
LEAKAGE_ATTRS = ("class", "colour", "pattern", "detail")

_SUBJECT_COLOURS = list(COLOURS)
_N_SUBJ = len(_SUBJECT_COLOURS)
_MARK = _N_SUBJ  # labels _MARK and _MARK + 1 are the two mark colours; _MARK + 2 is the background
_BG = _N_SUBJ + 2
_COLOUR_SHARE = 0.2
_SIGNATURE_GAP = 40.0
_FG_DISTANCE = 30.0  # the rendered texture is within 6 * sqrt(3) ~ 10.4; blurred edges need the margin


@dataclass
class SubjectReading:
    """What the pixels of one subject's region say.

    ``present``: a region of at least the minimum area was found; ``area``: its pixels; ``cls`` / ``body`` /
    ``pattern`` / ``pattern_colour`` / ``detail``: attribute names or ``"none"``; ``iou``: the class template's
    IoU in [0, 1]; ``mean_colour``: float [3] RGB in [0, 255] over the core; ``shares``: subject colour ->
    fraction of the core's subject-coloured pixels; ``core``: bool [S, S], region AND best template.
    """

    present: bool
    area: int = 0
    cls: str = "none"
    iou: float = 0.0
    body: str = "none"
    pattern: str = "none"
    pattern_colour: str = "none"
    detail: str = "none"
    mean_colour: np.ndarray | None = None
    shares: dict[str, float] = field(default_factory=dict)
    core: np.ndarray | None = None


def as_uint8_image(image: Any) -> np.ndarray:
    """``image`` (uint8 [S,S,3], or float [S,S,3] / [3,S,S] in [0,1], numpy or torch) -> uint8 [S,S,3]."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    x = np.asarray(image)
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"image of shape {x.shape} is invalid: expected [S, S, 3] or [3, S, S]")
    if x.shape[-1] != 3:
        x = np.moveaxis(x, 0, -1)
    if x.shape[0] != x.shape[1]:
        raise ValueError(f"image of shape {x.shape} is invalid: the toy world's images are square")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"image dtype {x.dtype} is invalid: expected uint8 or float in [0, 1]")
    if x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise ValueError(f"float image values in [{x.min():.3f}, {x.max():.3f}] are invalid: expected [0, 1]; "
                         "convert [-1, 1] outputs with (x + 1) / 2")
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def _neighbours4(mask: np.ndarray) -> np.ndarray:
    """Number of 4-neighbours of each pixel that are set in bool [H, W] ``mask`` -> int [H, W] in 0..4."""
    p = np.pad(mask, 1).astype(np.int64)
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]


def estimate_background(image: np.ndarray, background: str) -> np.ndarray:
    """The background colour as rendered: the median of the pixels within RGB distance 60 of the known colour
    when they are at least 20% of the image (absorbs a generator's global colour drift), else the known colour.
    Returns float [3]."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}: expected one of {', '.join(BACKGROUNDS)}")
    known = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    x = image.reshape(-1, 3).astype(np.float64)
    near = np.linalg.norm(x - known, axis=-1) < 60
    return np.median(x[near], axis=0) if near.mean() >= 0.2 else known


def label_pixels(image: np.ndarray, background: str) -> np.ndarray:
    """Palette label of each pixel of uint8 [S,S,3] -> int [S,S]: ``0..8`` subject colours (in ``COLOURS``
    order), 9 white mark, 10 black mark, 11 background.

    A pixel is foreground when its nearest colour among the palette and the (estimated) background is not the
    background, or when it lies further than ``max(30, 2.5 x the background's median noise)`` from the
    background (a colour far from every palette entry is still foreground); then isolated foreground pixels
    (no foreground 4-neighbour) are dropped and background pixels enclosed by 4 foreground ones are filled.
    Foreground pixels get the nearest subject or mark colour.
    """
    bg = estimate_background(image, background)
    x = image.astype(np.float64)
    palette = np.array([*COLOURS.values(), *MARK_COLOURS.values()], dtype=np.float64)
    d_pal = np.sqrt(((x[:, :, None, :] - palette[None, None]) ** 2).sum(-1))
    d_bg = np.linalg.norm(x - bg, axis=-1)
    nearest_bg = d_bg <= d_pal.min(-1)
    noise = float(np.median(d_bg[nearest_bg])) if nearest_bg.any() else 0.0
    fg = ~nearest_bg | (d_bg > max(_FG_DISTANCE, 2.5 * noise))
    fg &= _neighbours4(fg) >= 1
    fg |= _neighbours4(fg) == 4
    return np.where(fg, d_pal.argmin(-1), _BG)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool [H, W] mask, largest first (ties: the one whose first pixel comes first
    in row-major order), each a bool [H, W] mask.

    Vectorised label propagation: every set pixel starts with its own flat index as label and repeatedly takes
    the smallest label among itself and its 4-neighbours, then the label of the pixel its label points to
    (pointer jumping: labels are pixels of the same component); at the fixed point each component carries its
    smallest pixel index.
    """
    h, w = mask.shape
    size = h * w
    mask = mask.astype(bool)
    labels = np.where(mask, np.arange(size).reshape(h, w), size)
    while True:
        p = np.pad(labels, 1, constant_values=size)
        nb = np.where(mask, np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]),
                      size)
        flat = nb.ravel()
        jumped = np.where(mask.ravel(), flat[np.minimum(flat, size - 1)], size).reshape(h, w)
        new = np.minimum(nb, jumped)
        if np.array_equal(new, labels):
            break
        labels = new
    roots, counts = np.unique(labels[mask], return_counts=True)
    return [labels == roots[i] for i in np.lexsort((roots, -counts))]


def slot_strips(positions: list[str], side: int) -> list[tuple[int, int]]:
    """Column range ``[x0, x1)`` of each position's strip (cuts at midpoints between slot centres)."""
    k = len(positions)
    order = sorted(slot_centre(k, p) for p in positions)
    cuts = [0] + [round((a + b) / 2 * side) for a, b in zip(order[:-1], order[1:], strict=True)] + [side]
    return [(cuts[order.index(slot_centre(k, p))], cuts[order.index(slot_centre(k, p)) + 1]) for p in positions]


def _bbox_frame(region: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(region)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    return cx, cy, float(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))


def fit_class(region: np.ndarray) -> tuple[str, float, np.ndarray, tuple[float, float, float]]:
    """Best silhouette template for a non-empty bool [S,S] region.

    Returns ``(class, IoU in [0, 1], template bool [S,S], (cx, cy, size) in pixels)``.
    """
    cx0, cy0, size0 = _bbox_frame(region)
    side = region.shape[0]
    # Work on a crop around the bounding box: every candidate template lies within 1.5 px of it.
    y0, y1 = max(0, int(cy0 - size0 / 2) - 3), min(side, int(np.ceil(cy0 + size0 / 2)) + 3)
    x0, x1 = max(0, int(cx0 - size0 / 2) - 3), min(side, int(np.ceil(cx0 + size0 / 2)) + 3)
    crop = region[y0:y1, x0:x1]
    steps = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    cxs, cys, sizes = np.meshgrid(cx0 + steps, cy0 + steps, np.maximum(size0 + steps, 2.0), indexing="ij")
    cxs, cys, sizes = cxs.reshape(-1, 1, 1), cys.reshape(-1, 1, 1), sizes.reshape(-1, 1, 1)
    un = (np.arange(x0, x1)[None, None, :] + 0.5 - cxs) / (sizes / 2)
    vn = (np.arange(y0, y1)[None, :, None] + 0.5 - cys) / (sizes / 2)
    best = ("none", -1.0, crop, (cx0, cy0, size0))
    for cls in CLASSES:
        tmpl = shape_mask(cls, un, vn)
        iou = (tmpl & crop[None]).sum((1, 2)) / (tmpl | crop[None]).sum((1, 2))
        i = int(iou.argmax())
        if iou[i] > best[1]:
            best = (cls, float(iou[i]), tmpl[i], (float(cxs[i, 0, 0]), float(cys[i, 0, 0]), float(sizes[i, 0, 0])))
    full = np.zeros_like(region)
    full[y0:y1, x0:x1] = best[2]
    return best[0], best[1], full, best[3]


def read_colours(labels: np.ndarray, core: np.ndarray) -> tuple[str, str, dict[str, float]]:
    """Body colour, pattern colour (``"none"`` under 8%) and each subject colour's share of the core."""
    counts = np.bincount(labels[core], minlength=_BG + 1)[:_N_SUBJ].astype(np.float64)
    total = counts.sum()
    if total == 0:
        return "none", "none", {}
    shares = {name: float(c / total) for name, c in zip(_SUBJECT_COLOURS, counts, strict=True)}
    order = np.argsort(-counts, kind="stable")
    body = _SUBJECT_COLOURS[order[0]]
    pattern_colour = _SUBJECT_COLOURS[order[1]] if counts[order[1]] / total >= 0.08 else "none"
    return body, pattern_colour, shares


def read_pattern(labels: np.ndarray, core: np.ndarray, pattern_colour: str, unit: float) -> str:
    """The pattern whose best phase best explains where the pattern colour lies among the core's subject-
    coloured pixels; ``"none"`` without a pattern colour."""
    if pattern_colour == "none":
        return "none"
    sel = core & (labels < _N_SUBJ)
    ys, xs = np.nonzero(sel)
    target = labels[ys, xs] == _SUBJECT_COLOURS.index(pattern_colour)
    best, best_acc = "none", -1.0
    for name, period in PATTERNS.items():
        n = max(1, round(period * unit))
        ox, oy = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        du = xs[None, :] + 0.5 - ox.reshape(-1, 1)
        dv = ys[None, :] + 0.5 - oy.reshape(-1, 1)
        acc = (pattern_mask(name, du, dv, unit) == target[None]).mean(1).max()
        if acc > best_acc:
            best, best_acc = name, float(acc)
    return best


def read_detail(labels: np.ndarray, cls: str, frame: tuple[float, float, float], unit: float) -> str:
    """The mark at class ``cls``'s spot of the subject frame ``(cx, cy, size)``: the mark template with the best
    IoU (>= 0.5) against black/white pixels within 3 units of the spot, else ``"none"``."""
    cx, cy, size = frame
    su, sv = CLASSES[cls]
    sx, sy = cx + su * size / 2, cy + sv * size / 2
    coords = np.arange(labels.shape[0]) + 0.5
    near = (np.abs(coords[None, :] - sx) <= 3 * unit) & (np.abs(coords[:, None] - sy) <= 3 * unit)
    marks = near & (labels >= _MARK) & (labels < _BG)
    if not marks.any():
        return "none"
    # Shifts in quarter units, off the half-pixel grid so that no template edge ties with a pixel centre.
    shifts = (np.arange(-4, 5) * 0.25 + 0.1) * unit
    ox, oy = np.meshgrid(shifts, shifts, indexing="ij")
    a = coords[None, None, :] - (sx + ox.reshape(-1, 1, 1))
    b = coords[None, :, None] - (sy + oy.reshape(-1, 1, 1))
    ious = []
    for detail in DETAILS:
        tmpl = mark_mask(detail, a, b, unit)
        ious.append(((tmpl & marks).sum((1, 2)) / (tmpl | marks).sum((1, 2))).max())
    i = int(np.argmax(ious))
    return DETAILS[i] if ious[i] >= 0.5 else "none"


def read_subject(image: np.ndarray, labels: np.ndarray, strip: tuple[int, int], own_cls: str, unit: float,
                 min_area: int) -> SubjectReading:
    """Locate and read the subject expected in column range ``strip`` (see the module docstring)."""
    fg = labels != _BG
    in_strip = np.zeros_like(fg)
    in_strip[:, strip[0]:strip[1]] = fg[:, strip[0]:strip[1]]
    comps = connected_components(in_strip)
    if not comps or comps[0].sum() < min_area:
        return SubjectReading(present=False, area=int(comps[0].sum()) if comps else 0)
    region = comps[0]
    cls, iou, tmpl, frame = fit_class(region)
    core = region & tmpl
    body, pattern_colour, shares = read_colours(labels, core)
    mean = image[core].astype(np.float64).mean(0)
    return SubjectReading(
        present=True, area=int(region.sum()), cls=cls, iou=iou, body=body, pattern_colour=pattern_colour,
        pattern=read_pattern(labels, core, pattern_colour, unit), detail=read_detail(labels, own_cls, frame, unit),
        mean_colour=mean, shares=shares, core=core)


@lru_cache(maxsize=8192)
def colour_signature(identity: Identity) -> tuple[float, float, float]:
    """Mean RGB of an identity's pixels (body, pattern and mark) in a canonical render (32 px, size 13 px)."""
    rgb, shape = draw_subject(identity, Placement(0.5, 0.5, 13 / 32), 32, 1.0)
    return tuple(float(v) for v in rgb[shape].mean(0))


def subject_fidelity(identity: Identity, reading: SubjectReading) -> dict[str, float]:
    """1.0 per own attribute read back correctly, 0.0 otherwise (all 0 when the subject is missing)."""
    return {attr: float(reading.present and getattr(reading, "cls" if attr == "class" else attr) == value)
            for attr, value in identity.attributes.items()}


def _colour_leaked(own: Identity, other: Identity, reading: SubjectReading) -> bool | None:
    """Whether ``other``'s colour shows in ``own``'s region; None when the colours cannot be told apart."""
    sig_own, sig_other = np.array(colour_signature(own)), np.array(colour_signature(other))
    separable = np.linalg.norm(sig_own - sig_other) >= _SIGNATURE_GAP
    if other.body == own.body and not separable:
        return None
    own_colours = {own.body, own.pattern_colour}
    if other.body != own.body and reading.body == other.body:
        return True
    foreign = {other.body, other.pattern_colour} - own_colours
    if any(reading.shares.get(c, 0.0) >= _COLOUR_SHARE for c in foreign):
        return True
    if separable and reading.mean_colour is not None:
        return bool(np.linalg.norm(reading.mean_colour - sig_other) < np.linalg.norm(reading.mean_colour - sig_own))
    return False


def subject_leakage(identity: Identity, others: list[Identity], reading: SubjectReading) -> dict[str, float]:
    """Per leakage attribute: the share of the other subjects that differ from ``identity`` in it whose value
    appears in ``identity``'s region; NaN where no other subject differs (or the subject is missing)."""
    hits: dict[str, list[bool]] = {a: [] for a in LEAKAGE_ATTRS}
    if reading.present:
        for other in others:
            for attr, own_v, other_v, read_v in (("class", identity.cls, other.cls, reading.cls),
                                                 ("pattern", identity.pattern, other.pattern, reading.pattern),
                                                 ("detail", identity.detail, other.detail, reading.detail)):
                if own_v != other_v:
                    hits[attr].append(read_v == other_v)
            leaked = _colour_leaked(identity, other, reading)
            if leaked is not None:
                hits["colour"].append(leaked)
    return {a: float(np.mean(h)) if h else float("nan") for a, h in hits.items()}


CHANCE_DECOYS = 64


def chance_decoys(world: World) -> list[Identity]:
    """``CHANCE_DECOYS`` identities of the world (any split), fixed by the world's seed: the stand-ins of
    :func:`chance_leakage`. Cached on the world."""
    cached = getattr(world, "_chance_decoys", None)
    if cached is None:
        rng = np.random.default_rng([world.cfg.seed, 7_919])
        n = min(CHANCE_DECOYS, len(world.identities))
        cached = [world.identities[int(i)] for i in rng.choice(len(world.identities), size=n, replace=False)]
        world._chance_decoys = cached  # type: ignore[attr-defined]
    return cached


def chance_leakage(identity: Identity, others: list[Identity], reading: SubjectReading,
                   decoys: list[Identity], leakage: dict[str, float]) -> float:
    """The leakage the same reading shows toward identities that are *not* in the scene: per leakage attribute
    that the real leakage scores (``leakage``, :func:`subject_leakage` of ``identity`` against ``others``: the
    attributes where some other subject differs), the share of the decoys differing from ``identity`` whose value
    the region shows; their mean (NaN when the real leakage is NaN). A subject drawn with a wrong attribute
    matches another subject's value by chance as often as a decoy's; only ``leakage - chance`` measures
    attributes *carried over* from the subjects in the scene."""
    attrs = [a for a, v in leakage.items() if not np.isnan(v)]
    if not attrs:
        return float("nan")
    excluded = {identity.id, *(o.id for o in others)}
    chance = subject_leakage(identity, [d for d in decoys if d.id not in excluded], reading)
    values = [chance[a] for a in attrs if not np.isnan(chance[a])]
    return float(np.mean(values)) if values else float("nan")


def prompt_following(readings: list[SubjectReading], nouns: list[str], labels: np.ndarray,
                     min_area: int) -> dict[str, float]:
    """``count`` (1.0 when the subjects found, including foreground blobs outside every subject's region,
    number the subjects asked), ``classes`` (1.0 when the read classes equal the nouns as a multiset),
    ``positions`` (share of slots holding their noun) and ``prompt`` (their mean)."""
    cores = np.zeros(labels.shape, dtype=bool)
    for r in readings:
        if r.present and r.core is not None:
            cores |= r.core
    extras = [c for c in connected_components(labels != _BG) if c.sum() >= min_area and not (c & cores).any()]
    found = sum(r.present for r in readings) + len(extras)
    count = float(found == len(nouns))
    classes = float(Counter(r.cls for r in readings if r.present) == Counter(nouns))
    positions = float(np.mean([r.present and r.cls == n for r, n in zip(readings, nouns, strict=True)]))
    return {"count": count, "classes": classes, "positions": positions,
            "prompt": float(np.mean([count, classes, positions]))}


def score_scene(image: Any, scene: Scene, world: World) -> dict[str, Any]:
    """Score one generated (or ground-truth) image of ``scene``'s prompt.

    Args:
        image: uint8 [S,S,3], or float [S,S,3] / [3,S,S] in [0,1] (numpy or torch); any square size, the
            layout scales with it.
        scene: the scene whose prompt, identities (reference order), positions and background were asked.
        world: the world the scene comes from (its pattern scale).

    Returns a dict: ``subjects`` (per subject in reference order: ``position``, ``present``, ``read``
    attributes, ``fidelity`` and ``leakage`` per attribute, their means), per-scene ``fidelity`` and
    ``leakage`` (means over subjects, leakage NaN-skipping), ``fidelity/<attr>``, ``leakage/<attr>``,
    ``leak_rate`` (share of subjects with any leak), ``leakage_chance`` and ``transfer`` (per subject too; see
    :func:`chance_leakage`), and ``count``, ``classes``, ``positions``, ``prompt``.
    """
    img = as_uint8_image(image)
    side = img.shape[0]
    unit = world.scene_unit * side / world.cfg.scene_size  # pattern units scale with the image
    k = len(scene.identities)
    labels = label_pixels(img, scene.background)
    min_area = max(4, round(0.2 * (SIZES[k][0] * side) ** 2))
    strips = slot_strips(scene.positions, side)
    readings = [read_subject(img, labels, strip, ident.cls, unit, min_area)
                for strip, ident in zip(strips, scene.identities, strict=True)]
    subjects = []
    decoys = chance_decoys(world)
    for i, (ident, reading) in enumerate(zip(scene.identities, readings, strict=True)):
        fid = subject_fidelity(ident, reading)
        others = [o for j, o in enumerate(scene.identities) if j != i]
        leak = subject_leakage(ident, others, reading)
        valid = [v for v in leak.values() if not np.isnan(v)]
        leak_mean = float(np.mean(valid)) if valid else float("nan")
        chance = chance_leakage(ident, others, reading, decoys, leak)
        subjects.append({
            "position": scene.positions[i], "present": reading.present, "area": reading.area,
            "read": {"class": reading.cls, "body": reading.body, "pattern": reading.pattern,
                     "pattern_colour": reading.pattern_colour, "detail": reading.detail},
            "fidelity": fid, "leakage": leak, "fidelity_mean": float(np.mean(list(fid.values()))),
            "leakage_mean": leak_mean, "leakage_chance": chance, "transfer": leak_mean - chance,
            "leaked": bool(any(v > 0 for v in valid))})
    return {"subjects": subjects, **_scene_means(subjects),
            **prompt_following(readings, [i.noun for i in scene.identities], labels, min_area)}


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _scene_means(subjects: list[dict[str, Any]]) -> dict[str, float]:
    out = {"fidelity": _nanmean([s["fidelity_mean"] for s in subjects]),
           "leakage": _nanmean([s["leakage_mean"] for s in subjects]),
           "leak_rate": float(np.mean([s["leaked"] for s in subjects])),
           "leakage_chance": _nanmean([s["leakage_chance"] for s in subjects]),
           "transfer": _nanmean([s["transfer"] for s in subjects])}
    for attr in FIDELITY_ATTRS:
        out[f"fidelity/{attr}"] = _nanmean([s["fidelity"][attr] for s in subjects])
    for attr in LEAKAGE_ATTRS:
        out[f"leakage/{attr}"] = _nanmean([s["leakage"][attr] for s in subjects])
    return out


def aggregate(scores: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every per-scene value of :func:`score_scene` over scenes (NaN-skipping), plus ``n_scenes``.

    Keys: ``fidelity``, ``leakage``, ``prompt``, ``leak_rate``, ``leakage_chance``, ``transfer``, ``count``,
    ``classes``, ``positions``,
    ``fidelity/<attr>`` for ``FIDELITY_ATTRS`` and ``leakage/<attr>`` for ``LEAKAGE_ATTRS``.
    """
    if not scores:
        raise ValueError("aggregate needs at least one score_scene result, got an empty list")
    keys = [k for k, v in scores[0].items() if isinstance(v, float)]
    out = {k: _nanmean([s[k] for s in scores]) for k in keys}
    out["n_scenes"] = float(len(scores))
    return out
