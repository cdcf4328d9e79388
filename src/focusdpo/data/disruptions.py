"""Disruptions of DESIGN 2.7: how a negative is made from a positive, confined to subject regions.

Every disruption is a function ``fn(image, regions, target, rng, ctx) -> (proposal, params)``:

- ``image``: uint8 ``[H, W, 3]``, the positive;
- ``regions``: bool ``[K, H, W]``, the subject regions ``P_k`` (reference order);
- ``target``: index of the subject to disrupt;
- ``rng``: ``numpy.random.Generator`` (all randomness comes from it, so builds are reproducible);
- ``ctx``: :class:`DisruptionContext` (references, optional world hooks, plug-in extras such as a backbone);
- returns a full-size uint8 ``proposal`` and JSON-serialisable ``params``.

:func:`apply_disruption` composes the negative as ``proposal`` inside ``M_prior = P_target`` and the positive
everywhere else, so no disruption (built-in or plug-in) can touch a pixel outside ``M_prior``. Plug-ins
(e.g. ``regenerate``, which needs a backbone) are added with :func:`register_disruption`.

Built-ins:

- ``attribute_swap`` (2+ subjects): the target takes another subject's colour statistics (per-channel mean
  and std transfer), the attribute leakage FocusDPO fights.
- ``cross_paste`` (2+ subjects): the target region is filled with another subject's texture (its bounding
  box, resized to the target's; background pixels of that box replaced by the source's mean colour).
- ``detail_erase``: Gaussian blur or down-up sampling of the target, sized relative to its bounding box.
- ``patch_shuffle``: the target's bounding box is cut into a grid of cells that are permuted (never the
  identity permutation).
- ``identity_swap``: another instance of the same class at the same place; needs the ``swap_identity`` hook
  (the toy world provides it; manifests do not, so it is not drawn for them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

DisruptionFn = Callable[..., tuple[np.ndarray, dict[str, Any]]]


class DisruptionError(ValueError):
    """A disruption is unknown, not applicable, or misbehaved; the message says which and the fix."""


@dataclass
class DisruptionContext:
    """What a disruption may use besides the positive and its regions.

    Attributes:
        references: K uint8 ``[h_k, w_k, 3]`` reference images.
        ref_masks: K bool ``[h_k, w_k]``.
        prompt: the record's prompt.
        swap_identity: ``(target, rng) -> (uint8 [H, W, 3], params)``, a render of the same scene with subject
            ``target`` replaced by another instance of its class; None when unavailable.
        extras: capabilities for plug-ins (e.g. ``{"backbone": ...}`` for ``regenerate``).
    """

    references: list[np.ndarray] = field(default_factory=list)
    ref_masks: list[np.ndarray] = field(default_factory=list)
    prompt: str = ""
    swap_identity: Callable[[int, np.random.Generator], tuple[np.ndarray, dict[str, Any]]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def has(self, need: str) -> bool:
        """Whether capability ``need`` ("swap_identity" or an ``extras`` key) is available."""
        if need == "swap_identity":
            return self.swap_identity is not None
        return need in self.extras


@dataclass(frozen=True)
class Disruption:
    """A registered disruption: its function, the fewest subjects it needs, the context it needs."""

    name: str
    fn: DisruptionFn
    min_subjects: int = 1
    needs: tuple[str, ...] = ()


@dataclass
class DisruptionResult:
    """The outcome of :func:`apply_disruption`.

    Attributes:
        negative: uint8 ``[H, W, 3]``, equals the positive outside ``m_prior``.
        m_prior: bool ``[H, W]``, the disrupted subjects' union.
        subjects: disrupted subject indices.
        params: the disruption's parameters.
        changed: fraction of ``m_prior`` pixels that differ from the positive, in [0, 1].
    """

    negative: np.ndarray
    m_prior: np.ndarray
    subjects: list[int]
    params: dict[str, Any]
    changed: float


_REGISTRY: dict[str, Disruption] = {}


def register_disruption(name: str, fn: DisruptionFn, min_subjects: int = 1, needs: tuple[str, ...] = (),
                        replace: bool = False) -> None:
    """Add a disruption under ``name`` (e.g. ``regenerate``, registered by the backbone package).

    ``fn`` follows the signature in the module docstring. ``needs`` names context capabilities
    (``"swap_identity"`` or keys of :attr:`DisruptionContext.extras`); records whose context lacks one never
    draw it. Registering an existing name raises unless ``replace=True``.
    """
    if name in _REGISTRY and not replace:
        raise DisruptionError(f"disruption {name!r} is already registered; pass replace=True to override it")
    if min_subjects < 1:
        raise DisruptionError(f"disruption {name!r}: min_subjects={min_subjects} must be >= 1")
    _REGISTRY[name] = Disruption(name, fn, min_subjects, tuple(needs))


def registered_disruptions() -> dict[str, Disruption]:
    """A copy of the registry, name -> :class:`Disruption`."""
    return dict(_REGISTRY)


def get_disruption(name: str) -> Disruption:
    """The registered disruption ``name``; raises naming the registered ones and how to add more."""
    if name not in _REGISTRY:
        raise DisruptionError(f"disruption {name!r} is not registered (registered: {', '.join(sorted(_REGISTRY))}); "
                              "plug-ins such as 'regenerate' register themselves with register_disruption() "
                              "when their package is imported, or drop it from data.disruptions")
    return _REGISTRY[name]


def check_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """Validate a disruption mix (every positive-weight name registered) and return it normalised to sum 1."""
    total = float(sum(w for w in mix.values() if w > 0))
    if total <= 0:
        raise DisruptionError(f"disruption mix {dict(mix)} has no positive weight; give at least one name a weight")
    for name, w in mix.items():
        if w > 0:
            get_disruption(name)
    return {name: float(w) / total for name, w in mix.items() if w > 0}


def applicable(mix: Mapping[str, float], num_subjects: int, ctx: DisruptionContext) -> dict[str, float]:
    """The positive-weight entries of ``mix`` that a record with ``num_subjects`` subjects and ``ctx`` allows."""
    out = {}
    for name, w in mix.items():
        d = get_disruption(name)
        if w > 0 and num_subjects >= d.min_subjects and all(ctx.has(n) for n in d.needs):
            out[name] = float(w)
    return out


def draw_disruption(mix: Mapping[str, float], num_subjects: int, ctx: DisruptionContext,
                    rng: np.random.Generator) -> str:
    """Draw a disruption name from ``mix`` renormalised over those applicable to this record."""
    cands = applicable(mix, num_subjects, ctx)
    if not cands:
        raise DisruptionError(f"no disruption of the mix {dict(mix)} applies to a record with {num_subjects} "
                              "subject(s) and this context; add a one-subject disruption such as detail_erase")
    names = sorted(cands)
    p = np.array([cands[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def apply_disruption(name: str, image: np.ndarray, regions: np.ndarray, rng: np.random.Generator,
                     ctx: DisruptionContext, target: int | None = None) -> DisruptionResult:
    """Disrupt subject ``target`` (drawn when None) of ``image`` uint8 [H, W, 3] with the disruption ``name``.

    The negative is the proposal inside ``M_prior = regions[target]`` and the positive elsewhere.
    """
    d = get_disruption(name)
    k = regions.shape[0]
    if k < d.min_subjects:
        raise DisruptionError(f"disruption {name!r} needs {d.min_subjects} subjects, the record has {k}")
    if target is None:
        target = int(rng.integers(k))
    proposal, params = d.fn(image, regions, target, rng, ctx)
    if proposal.shape != image.shape or proposal.dtype != np.uint8:
        raise DisruptionError(f"disruption {name!r} returned {proposal.dtype} {proposal.shape}; "
                              f"it must return uint8 {image.shape}")
    m_prior = regions[target].copy()
    negative = np.where(m_prior[..., None], proposal, image)
    n_in = int(m_prior.sum())
    changed = float((negative != image).any(axis=-1).sum() / n_in) if n_in else 0.0
    return DisruptionResult(negative, m_prior, [target], dict(params), changed)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) exclusive bounds of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise DisruptionError("cannot disrupt an empty subject region; the builder rejects empty masks first")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _other_subject(k: int, target: int, rng: np.random.Generator) -> int:
    others = [i for i in range(k) if i != target]
    return int(others[int(rng.integers(len(others)))])


def attribute_swap(image: np.ndarray, regions: np.ndarray, target: int, rng: np.random.Generator,
                   ctx: DisruptionContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-channel mean/std colour transfer from another subject's region onto the target's."""
    src = _other_subject(regions.shape[0], target, rng)
    x = image.astype(np.float64)
    t_px, s_px = x[regions[target]], x[regions[src]]
    mu_t, sd_t = t_px.mean(0), t_px.std(0)
    mu_s, sd_s = s_px.mean(0), s_px.std(0)
    # A flat target (sd 0) takes the source mean; otherwise z-scores are rescaled to the source statistics.
    scale = np.where(sd_t > 1e-6, sd_s / np.maximum(sd_t, 1e-6), 0.0)
    out = np.clip(np.rint((x - mu_t) * scale + mu_s), 0, 255).astype(np.uint8)
    return out, {"source": src}


def cross_paste(image: np.ndarray, regions: np.ndarray, target: int, rng: np.random.Generator,
                ctx: DisruptionContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Fill the target with another subject's texture (its box resized to the target's box)."""
    src = _other_subject(regions.shape[0], target, rng)
    t0, l0, b0, r0 = _bbox(regions[target])
    t1, l1, b1, r1 = _bbox(regions[src])
    crop = image[t1:b1, l1:r1].copy()
    crop[~regions[src][t1:b1, l1:r1]] = image[regions[src]].mean(0).round().astype(np.uint8)
    size = (r0 - l0, b0 - t0)
    out = image.copy()
    out[t0:b0, l0:r0] = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.NEAREST))
    return out, {"source": src}


def detail_erase(image: np.ndarray, regions: np.ndarray, target: int, rng: np.random.Generator,
                 ctx: DisruptionContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Blur (Gaussian) or down-up sample the image; sizes are relative to the target's bounding box."""
    top, left, bottom, right = _bbox(regions[target])
    side = min(bottom - top, right - left)
    pil = Image.fromarray(image)
    if rng.random() < 0.5:
        radius = float(max(1.0, side * rng.uniform(0.03, 0.12)))
        out = pil.filter(ImageFilter.GaussianBlur(radius))
        return np.asarray(out), {"mode": "blur", "radius": round(radius, 3)}
    factor = int(max(2, round(side / rng.uniform(6, 16))))
    h, w = image.shape[:2]
    small = pil.resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)), {"mode": "downup", "factor": factor}


def patch_shuffle(image: np.ndarray, regions: np.ndarray, target: int, rng: np.random.Generator,
                  ctx: DisruptionContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Cut the target's bounding box into a ``g x g`` grid and permute the cells (never the identity)."""
    top, left, bottom, right = _bbox(regions[target])
    g = int(rng.integers(2, 5))
    ch, cw = max(1, (bottom - top) // g), max(1, (right - left) // g)
    gh, gw = max(1, (bottom - top) // ch), max(1, (right - left) // cw)
    n = gh * gw
    if n < 2:
        return image.copy(), {"grid": [gh, gw], "cell": [ch, cw]}
    perm = rng.permutation(n)
    while np.array_equal(perm, np.arange(n)):
        perm = rng.permutation(n)
    out = image.copy()
    cells = [image[top + (i // gw) * ch: top + (i // gw + 1) * ch, left + (i % gw) * cw: left + (i % gw + 1) * cw]
             for i in range(n)]
    for dst, src in enumerate(perm):
        r, c = top + (dst // gw) * ch, left + (dst % gw) * cw
        out[r:r + ch, c:c + cw] = cells[src]
    return out, {"grid": [gh, gw], "cell": [ch, cw]}


def identity_swap(image: np.ndarray, regions: np.ndarray, target: int, rng: np.random.Generator,
                  ctx: DisruptionContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Another instance of the target's class in its place (through ``ctx.swap_identity``)."""
    if ctx.swap_identity is None:
        raise DisruptionError("identity_swap needs DisruptionContext.swap_identity (the toy world provides it)")
    return ctx.swap_identity(target, rng)


register_disruption("attribute_swap", attribute_swap, min_subjects=2)
register_disruption("cross_paste", cross_paste, min_subjects=2)
register_disruption("detail_erase", detail_erase)
register_disruption("patch_shuffle", patch_shuffle)
register_disruption("identity_swap", identity_swap, needs=("swap_identity",))
