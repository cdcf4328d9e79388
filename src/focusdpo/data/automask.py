"""``--auto-masks``: which backend masks a manifest record's subjects, and the fallback when models are missing.

``data.mask_backend``:

- ``models``: the detector + segmenter of :mod:`focusdpo.data.mask_models` (``data.mask_detector``,
  ``data.mask_segmenter``); they must load, and a record they cannot mask is rejected.
- ``grabcut``: OpenCV GrabCut (:mod:`focusdpo.data.masks`; one subject: centre box; K: boxes, components or
  strips, ordered by colour).
- ``auto`` (default): the models when they load, else GrabCut for the whole build with the reason printed;
  a record the models cannot mask (a class word not found, an implausible mask) gets GrabCut masks, the
  reason kept in its provenance (``mask_origin.fallback``).

The detector is queried with each subject's class words: the reference's ``class`` in the manifest, else the
prompt's subject phrases (:func:`prompt_subjects`: "a dog and a backpack in the jungle" -> dog, backpack), in
reference order. Two subjects with the same words ("a dog and a dog") are told apart by colour
(:func:`focusdpo.data.masks.colour_order` among the detections of that class).

Every automatic mask must cover ``AUTO_MASK_AREA`` (1 %..95 %) of its image; pixels claimed by several
subjects go to the smallest mask (the subject in front, usually).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from focusdpo.data.mask_models import MaskModels, MaskModelsUnavailable, SubjectNotFound

BACKENDS = ("auto", "models", "grabcut")
# Automatic masks covering less or more than these fractions of the image are failures, not subjects.
AUTO_MASK_AREA = (0.01, 0.95)


class MaskFailure(ValueError):
    """An automatic mask of one image failed; ``str(err)`` is the reason."""


_ARTICLE = re.compile(r"^(?:a|an|the|one|two|three|some|\d+)\s+", re.IGNORECASE)
# Where a subject phrase ends and its scene or attributes start ("a dog in the jungle", "a dog wearing a hat").
_TAIL = re.compile(r"(?:^|\s+)(?:in|on|at|with|wearing|near|next|under|beside|by|behind|from|inside|over|under|"
                   r"sitting|standing|lying|playing|floating|is|are)\b.*$", re.IGNORECASE)


def prompt_subjects(prompt: str, k: int) -> list[str] | None:
    """The K subject phrases of a prompt of the form "a X and a Y[, and a Z] <scene>", in order; None when the
    prompt does not split into exactly K non-empty phrases (then give each reference a ``class``).

    >>> prompt_subjects("a dog and a backpack in the jungle", 2)
    ['dog', 'backpack']
    """
    parts = [p for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", prompt.strip().rstrip(".")) if p.strip()]
    phrases = [_TAIL.sub("", _ARTICLE.sub("", p.strip())).strip() for p in parts]
    if len(phrases) != k or not all(phrases):
        return None
    return phrases


@dataclass
class AutoMasker:
    """Masks subjects of one build's records (module docstring).

    Attributes:
        backend: ``models`` or ``grabcut``, the one in use; strict: ``data.mask_backend=models`` was asked
            (no GrabCut fallback per record); reason: why GrabCut when ``auto`` fell back; info: for the card.
    """

    backend: str = "grabcut"
    models: MaskModels | None = None
    strict: bool = False
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def reference(self, image: np.ndarray, query: str | None) -> tuple[np.ndarray, str, str | None]:
        """``(mask bool [H, W], origin, fallback reason or None)`` of a one-subject reference photo."""
        if self.models is not None:
            try:
                if query is None:
                    raise MaskFailure("no class words for the detector (give the reference a 'class')")
                masks, _, _ = self.models.masks(image, [query])
                return _checked(masks, "the reference")[0], "models", None
            except (MaskFailure, SubjectNotFound) as e:
                if self.strict:
                    raise MaskFailure(f"models: {e}") from e
                fallback = f"models: {e}"
        else:
            fallback = None
        from focusdpo.data.masks import grabcut_mask

        return _checked(grabcut_mask(image)[None], "the reference", "GrabCut")[0], "grabcut", fallback

    def target(self, image: np.ndarray, queries: list[str | None], references: list[np.ndarray],
               ref_masks: list[np.ndarray], boxes: list[tuple[int, int, int, int]] | None = None
               ) -> tuple[np.ndarray, str, str | None]:
        """``(regions bool [K, H, W] in reference order, origin, fallback reason or None)`` of a target photo."""
        if self.models is not None:
            try:
                return self._models_target(image, queries, references, ref_masks, boxes) + (None,)
            except (MaskFailure, SubjectNotFound) as e:
                if self.strict:
                    raise MaskFailure(f"models: {e}") from e
                fallback = f"models: {e}"
        else:
            fallback = None
        return self._grabcut_target(image, references, ref_masks, boxes) + (fallback,)

    def _models_target(self, image, queries, references, ref_masks, boxes) -> tuple[np.ndarray, str]:
        assert self.models is not None
        if boxes is not None:
            return _checked(self.models.segment(image, np.asarray(boxes, float)), "the target"), "models-boxes"
        if any(q is None for q in queries):
            raise MaskFailure("no class words for the detector: the prompt does not name the subjects as "
                              "'a X and a Y ...'; give each reference a 'class'")
        masks, _, _ = self.models.masks(image, list(queries))  # type: ignore[arg-type]
        same = np.array([[qi == qj for qj in queries] for qi in queries])
        if same.sum() > len(queries):  # a class shared by several subjects: tell those apart by colour
            masks = masks[_order(image, masks, references, ref_masks, same)]
        return _checked(masks, "the target"), "models"

    def _grabcut_target(self, image, references, ref_masks, boxes) -> tuple[np.ndarray, str]:
        from focusdpo.data.masks import grabcut_mask, grabcut_subjects

        k = len(references)
        if k == 1 and boxes is None:
            return _checked(grabcut_mask(image)[None], "the target", "GrabCut"), "grabcut"
        masks, layout = grabcut_subjects(image, k, boxes)
        if layout != "boxes":
            masks = masks[_order(image, masks, references, ref_masks, None)]
        return _checked(masks, "the target", "GrabCut"), f"grabcut-{layout}"


def _order(image, masks, references, ref_masks, allowed) -> list[int]:
    from focusdpo.data.masks import colour_order

    return colour_order(image, masks, references, ref_masks, allowed)


def _checked(masks: np.ndarray, name: str, who: str = "the models") -> np.ndarray:
    """``masks`` bool [K, H, W] with overlaps given to the smallest mask; :class:`MaskFailure` when one covers
    less or more than ``AUTO_MASK_AREA`` of the image."""
    areas = masks.reshape(len(masks), -1).mean(axis=1)
    for i, frac in enumerate(areas):
        if not AUTO_MASK_AREA[0] <= frac <= AUTO_MASK_AREA[1]:
            which = f" (subject {i})" if len(masks) > 1 else ""
            raise MaskFailure(f"{who} found a foreground of {frac:.1%} of {name}{which}, outside the plausible "
                              f"{AUTO_MASK_AREA[0]:.0%}..{AUTO_MASK_AREA[1]:.0%}; give a mask in the manifest")
    if len(masks) > 1 and (masks.sum(0) > 1).any():
        owner = np.where(masks, areas[:, None, None], np.inf).argmin(0)
        masks = masks & (owner[None] == np.arange(len(masks))[:, None, None])
        if not masks.reshape(len(masks), -1).any(axis=1).all():
            raise MaskFailure(f"{who}' masks of {name} overlap so that a subject keeps no pixel of its own; "
                              "give masks or boxes in the manifest")
    return masks


def make_masker(data_cfg, log: Callable[[str], None]) -> AutoMasker:
    """The :class:`AutoMasker` of ``data.mask_*`` (loads the models unless ``grabcut``); ``log`` gets one line
    saying which backend is used and, when ``auto`` falls back, why.

    Raises ``ValueError`` when ``models`` was asked and they cannot load, ``ImportError`` (naming the extra) when
    GrabCut is needed and OpenCV is missing.
    """
    from focusdpo.data.masks import require_opencv

    backend = data_cfg.mask_backend
    names = {"detector": data_cfg.mask_detector, "segmenter": data_cfg.mask_segmenter}
    if backend in ("auto", "models"):
        from focusdpo.data.mask_models import load_mask_models

        try:
            models = load_mask_models(data_cfg.mask_detector, data_cfg.mask_segmenter, data_cfg.mask_device,
                                      data_cfg.mask_min_score)
        except MaskModelsUnavailable as e:
            if backend == "models":
                raise ValueError(f"data.mask_backend=models: {e} (data.mask_backend=auto falls back to "
                                 "GrabCut)") from e
            try:
                require_opencv()
            except ImportError as ie:
                raise ImportError(f"--auto-masks: the mask models are unavailable ({e}) and GrabCut {ie}") from ie
            log(f"auto masks: GrabCut (the detector/segmenter are unavailable: {e})")
            return AutoMasker("grabcut", reason=str(e), info={"backend": "grabcut", "requested": backend,
                                                               **names, "reason": str(e)})
        log(f"auto masks: {data_cfg.mask_detector} + {data_cfg.mask_segmenter} on {data_cfg.mask_device}"
            + ("" if backend == "models" else " (GrabCut for records they cannot mask)"))
        return AutoMasker("models", models, strict=backend == "models",
                          info={"backend": "models", "requested": backend, **names})
    require_opencv()
    log("auto masks: GrabCut (data.mask_backend=grabcut)")
    return AutoMasker("grabcut", info={"backend": "grabcut", "requested": backend})
