"""Judges of on-policy DIP candidates and the identity assignment they share with the confusion metric (issue 16).

A *candidate* is a DIP pair whose negative the current policy drew by regenerating subject ``target``'s region
(:mod:`focusdpo.train.refresh`). A judge says whether that negative is measurably worse than the positive, why
not when it is not, and by how much (:class:`Verdict`: ``score_pos - score_neg`` is the *gap*). Three judges,
one interface (``judge(candidate, target) -> Verdict``, :func:`make_judge`):

- ``toy``: ground truth of the synthetic world. The record's identities (its ``source``) are the truth; the
  toy metrics (:func:`focusdpo.world.metrics.score_scene`) read the target subject in both images. Kept when the
  negative loses one of the target's attributes (``lost_fidelity``) or shows another subject's (``gained_leakage``)
  relative to the positive. Score: the target's fidelity minus its leakage.
- ``matching`` (real images): each subject region of an image is cropped (its bounding box), embedded, and the
  crops are assigned to the references by a Hungarian assignment on the cosine-similarity matrix
  (:func:`identity_assignment`, ``scipy.optimize.linear_sum_assignment``). Kept when the negative's assignment
  disagrees with the prompt's order (``confusion``: region ``k`` is matched to another reference) or the
  target's own similarity drops by at least ``margin`` (``similarity_drop``). A positive whose own assignment
  already disagrees cannot be judged (``positive_confused``). Score: the target's similarity to its reference.
  The embedder is the DreamBench DINO model (:func:`dino_embedder`, ``eval.dino_model``) or any function
  ``list of uint8 [h, w, 3] -> [n, D]`` (tests plant one; the toy world's is
  :func:`focusdpo.world.embedding.subject_embedder`, :func:`colour_embedder` sees colours only).
- ``changed``: no judgement; keeps every negative that differs from the positive (the unjudged ablation).

The same assignment, per generated image, is the identity-confusion metric of ``focusdpo eval``
(:func:`confusion_scores`): the share of images whose assignment disagrees with the prompt, and the mean
similarity of each region to its own reference.

Layering: this module sits beside ``runs`` and ``lora`` (imported by ``train`` and ``eval``); only
:func:`dino_embedder` reaches into ``focusdpo.eval.dreambench`` (lazily, for its model loader and DINO
preprocessing), so the trainer imports no evaluation code unless a run asks for the ``matching`` judge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

JUDGES = ("toy", "matching", "changed")

Embed = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclass
class Verdict:
    """A judge's decision on one candidate. ``reason``: why kept (``lost_fidelity``, ``gained_leakage``,
    ``confusion``, ``similarity_drop``, ``changed``) or why rejected (``not_worse``, ``unchanged``,
    ``positive_unreadable``, ``positive_confused``); ``details``: JSON-serialisable specifics."""

    keep: bool
    reason: str
    score_pos: float
    score_neg: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """How much worse the negative is: ``score_pos - score_neg`` (positive when worse)."""
        return float(self.score_pos - self.score_neg)


class JudgeError(ValueError):
    """A candidate cannot be judged by this judge (e.g. a toy judge without the world's ground truth)."""


# ------------------------------------------------------------------------------------------- assignment


def bbox_crop(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The bounding box of bool ``region`` ``[H, W]`` cut from uint8 ``image`` ``[H, W, 3]`` (the whole image
    when the region is empty)."""
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return image
    return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def similarity(crops: Sequence[np.ndarray], references: Sequence[np.ndarray], embed: Embed) -> np.ndarray:
    """Cosine similarity ``[R, K]`` between the embedded crops and the embedded references."""
    emb = np.asarray(embed(list(crops) + list(references)), dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb[:len(crops)] @ emb[len(crops):].T


def identity_assignment(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment of regions (rows) to references (columns) maximising the total similarity.

    Returns ``(assigned [R] int, matched [R] float)``: the reference each region is matched to (-1 when there
    are more regions than references) and that pair's similarity (NaN when unmatched). Ties go to the lower
    index (``scipy``'s deterministic solver).
    """
    from scipy.optimize import linear_sum_assignment

    sim = np.asarray(sim, dtype=np.float64)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    assigned = np.full(sim.shape[0], -1, dtype=np.int64)
    matched = np.full(sim.shape[0], np.nan)
    assigned[rows] = cols
    matched[rows] = sim[rows, cols]
    return assigned, matched


def is_confused(assigned: np.ndarray) -> bool:
    """True when some region ``k`` is assigned to a reference other than ``k`` (the prompt's order)."""
    return bool(np.any(assigned != np.arange(len(assigned))))


def assign_image(image: np.ndarray, regions: np.ndarray, references: Sequence[np.ndarray], embed: Embed
                 ) -> dict[str, Any]:
    """Crop each region of ``image``, assign the crops to ``references``: ``sim`` ``[K, K]``, ``assigned``,
    ``matched``, ``own`` (each region's similarity to its own reference), ``margin`` (each region's best
    similarity to *another* reference minus its own: > 0 when it looks more like another subject), ``confused``."""
    crops = [bbox_crop(image, r) for r in regions]
    sim = similarity(crops, references, embed)
    assigned, matched = identity_assignment(sim)
    own = np.array([sim[k, k] if k < sim.shape[1] else np.nan for k in range(sim.shape[0])])
    margin = confusion_margin(sim)
    return {"sim": sim, "assigned": assigned, "matched": matched, "own": own, "margin": margin,
            "confused": is_confused(assigned)}


def confusion_margin(sim: np.ndarray) -> np.ndarray:
    """Per region ``k`` of similarity ``[R, K]``: ``max_{j != k} sim[k, j] - sim[k, k]`` (NaN without an own
    reference or another one). The continuous side of the assignment: the Hungarian assignment flips only when a
    region looks more like another reference than that reference's own region does, while the margin rises with
    every attribute a region borrows."""
    sim = np.asarray(sim, dtype=np.float64)
    out = np.full(sim.shape[0], np.nan)
    for k in range(min(sim.shape)):
        others = np.delete(sim[k], k)
        if others.size:
            out[k] = others.max() - sim[k, k]
    return out


def confusion_scores(images: Sequence[np.ndarray], regions: Sequence[np.ndarray],
                     references: Sequence[Sequence[np.ndarray]], embed: Embed) -> list[dict[str, Any]]:
    """The identity-confusion metric per image: ``confused`` (0/1, the assignment disagrees with the prompt's
    order), ``matched_sim`` (mean similarity of each region to the reference it is assigned to), ``own_sim``
    (mean similarity of each region to its own reference) and ``margin`` (mean :func:`confusion_margin`).
    ``regions[i]``: bool ``[K, H, W]``."""
    out = []
    for image, regs, refs in zip(images, regions, references, strict=True):
        a = assign_image(image, regs, refs, embed)
        out.append({"confused": float(a["confused"]), "matched_sim": float(np.nanmean(a["matched"])),
                    "own_sim": float(np.nanmean(a["own"])), "margin": float(np.nanmean(a["margin"])),
                    "assigned": a["assigned"].tolist()})
    return out


# ------------------------------------------------------------------------------------------- embedders


def colour_embedder(bins: int = 4) -> Embed:
    """A fixed, download-free embedder for the toy world: the joint RGB histogram (``bins`` per channel) of a
    crop's pixels that differ from its border colour (the plain background of references and scenes), plus
    their share of the crop. It sees colours and pattern colours, not shapes."""

    def embed(images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for im in images:
            im = np.asarray(im)
            border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]]).astype(np.int64)
            bg = np.median(border, axis=0)
            fg = np.abs(im.astype(np.int64) - bg).sum(-1) > 30
            px = im[fg] if fg.any() else im.reshape(-1, 3)
            q = (px.astype(np.int64) * bins) // 256
            hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3).astype(np.float64)
            out.append(np.concatenate([hist / max(hist.sum(), 1.0), [fg.mean()]]))
        return np.stack(out)
    return embed


def dino_embedder(model: str, device: str = "cpu", batch_size: int = 16) -> Embed:
    """The DreamBench DINO scorer (CLS embedding, the protocol's preprocessing) as an :data:`Embed`."""
    from PIL import Image
    from transformers import AutoModel

    from focusdpo.eval.dreambench import DreamBenchError, Scorer

    try:
        dino = AutoModel.from_pretrained(model).eval().to(device)
    except OSError as e:
        raise DreamBenchError(f"eval.dino_model={model!r} could not be loaded for the matching judge ({e}); give a "
                              f"local folder saved by save_pretrained or a reachable hub id") from e
    scorer = Scorer(dino, None, None, dino.device, batch_size)  # type: ignore[arg-type]

    def embed(images: Sequence[np.ndarray]) -> np.ndarray:
        return scorer.embed_dino([Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]).numpy()
    return embed


# ---------------------------------------------------------------------------------------------- judges


@dataclass
class Candidate:
    """What a judge sees: ``positive``/``negative`` uint8 ``[H, W, 3]``, ``regions`` bool ``[K, H, W]``,
    the prompt, K reference images and the record's ``source`` (provenance: the toy world's identities)."""

    positive: np.ndarray
    negative: np.ndarray
    regions: np.ndarray
    prompt: str
    references: Sequence[np.ndarray]
    source: dict[str, Any] = field(default_factory=dict)


class ChangedJudge:
    """Keeps every negative that differs from the positive (no judgement); score: mean absolute pixel change
    inside the target's region (the positive scores 0)."""

    name = "changed"

    def judge(self, cand: Candidate, target: int) -> Verdict:
        region = cand.regions[target]
        diff = np.abs(cand.negative.astype(np.int64) - cand.positive.astype(np.int64))[region]
        change = float(diff.mean() / 255.0) if diff.size else 0.0
        keep = bool(diff.any())
        return Verdict(keep, "changed" if keep else "unchanged", 0.0, -change)


class MatchingJudge:
    """The ``matching`` judge (module docstring): Hungarian assignment of region crops to references."""

    name = "matching"

    def __init__(self, embed: Embed, margin: float = 0.05) -> None:
        self.embed, self.margin = embed, float(margin)

    def judge(self, cand: Candidate, target: int) -> Verdict:
        pos = assign_image(cand.positive, cand.regions, cand.references, self.embed)
        neg = assign_image(cand.negative, cand.regions, cand.references, self.embed)
        s_pos, s_neg = float(pos["own"][target]), float(neg["own"][target])
        details = {"assigned_pos": pos["assigned"].tolist(), "assigned_neg": neg["assigned"].tolist()}
        if pos["confused"]:
            return Verdict(False, "positive_confused", s_pos, s_neg, details)
        if neg["confused"]:
            return Verdict(True, "confusion", s_pos, s_neg, details)
        if s_pos - s_neg >= self.margin:
            return Verdict(True, "similarity_drop", s_pos, s_neg, details)
        return Verdict(False, "not_worse", s_pos, s_neg, details)


class ToyJudge:
    """The ``toy`` judge (module docstring): ground truth from the record's identities and the toy metrics."""

    name = "toy"

    def __init__(self, world: Any) -> None:
        self.world = world

    def _scene(self, cand: Candidate) -> Any:
        from focusdpo.world import Scene
        from focusdpo.world.prompts import parse_prompt

        ids = cand.source.get("identities")
        if not ids or len(ids) != len(cand.regions):
            raise JudgeError(f"the toy judge needs the toy world's identities in the record's source (got "
                             f"{cand.source.get('builder', 'no builder')!r} provenance): use "
                             f"data.refresh_judge=matching or changed for records not built from the toy world")
        _, positions, background = parse_prompt(cand.prompt)
        idents = [self.world.identities[int(i)] for i in ids]
        return Scene(cand.prompt, idents, positions, background, [], cand.positive, cand.regions,
                     list(cand.references), [])

    def judge(self, cand: Candidate, target: int) -> Verdict:
        from focusdpo.world.metrics import score_scene

        scene = self._scene(cand)
        pos = score_scene(cand.positive, scene, self.world)["subjects"][target]
        neg = score_scene(cand.negative, scene, self.world)["subjects"][target]

        def score(s: dict[str, Any]) -> float:
            leak = s["leakage_mean"]
            return float(s["fidelity_mean"] - (0.0 if np.isnan(leak) else leak))

        s_pos, s_neg = score(pos), score(neg)
        lost = sorted(a for a, v in neg["fidelity"].items() if v < pos["fidelity"][a])
        leaked = sorted(a for a, v in neg["leakage"].items()
                        if not np.isnan(v) and v > (0.0 if np.isnan(pos["leakage"][a]) else pos["leakage"][a]))
        details = {"lost": lost, "leaked": leaked}
        if not pos["present"]:
            return Verdict(False, "positive_unreadable", s_pos, s_neg, details)
        if leaked:
            return Verdict(True, "gained_leakage", s_pos, s_neg, details)
        if lost:
            return Verdict(True, "lost_fidelity", s_pos, s_neg, details)
        return Verdict(False, "not_worse", s_pos, s_neg, details)


def make_judge(name: str, world: Any = None, embed: Embed | None = None, margin: float = 0.05) -> Any:
    """A judge by name (:data:`JUDGES`): ``toy`` needs ``world``; ``matching`` needs ``embed``."""
    if name == "toy":
        if world is None:
            raise JudgeError("the toy judge needs the toy world (focusdpo.world.World)")
        return ToyJudge(world)
    if name == "matching":
        if embed is None:
            raise JudgeError("the matching judge needs an embedder (dino_embedder(eval.dino_model) or your own)")
        return MatchingJudge(embed, margin)
    if name == "changed":
        return ChangedJudge()
    raise JudgeError(f"judge {name!r} is unknown: allowed {', '.join(JUDGES)}")
