"""Promptable subject masks from ``transformers``: an open-vocabulary detector finds a box for each subject's
class words, a promptable segmenter turns each box into a mask.

- Detector (``data.mask_detector``): OWL-ViT or OWLv2 (``OwlViTForObjectDetection``,
  ``Owlv2ForObjectDetection``, e.g. ``google/owlv2-base-patch16-ensemble``), queried with one text per subject.
- Segmenter (``data.mask_segmenter``): SAM (``SamModel``, e.g. ``facebook/sam-vit-base``), prompted with the
  boxes.

Both load through ``from_pretrained`` from a local folder or a hub id: first from the local cache only, then
(unless ``HF_HUB_OFFLINE`` is set) from the Hub. Any failure raises :class:`MaskModelsUnavailable` with the
reason; :mod:`focusdpo.data.automask` then falls back to GrabCut. Weights load through safetensors and never
run remote code.

Box choice (:func:`pick_boxes`): every (box, subject) pair of the detector is scored; pairs are taken best
first, one box per subject, skipping a box under one pixel wide or high and a box that overlaps a box already
taken by IoU > ``max_iou`` (so two subjects of one class, "a dog and a dog", get two different dogs). A subject
whose best remaining score is under ``min_score`` is not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DETECTOR_TYPES = ("owlvit", "owlv2")
SEGMENTER_TYPES = ("sam",)


class MaskModelsUnavailable(RuntimeError):
    """The detector or segmenter cannot be loaded or used here; ``str(err)`` is the reason."""


class SubjectNotFound(ValueError):
    """The detector found no box for a subject above the score threshold; ``str(err)`` names it."""


@dataclass
class MaskModels:
    """A loaded detector + segmenter pair (eval mode, on ``device``)."""

    detector: Any
    det_processor: Any
    segmenter: Any
    seg_processor: Any
    device: str = "cpu"
    min_score: float = 0.1
    max_iou: float = 0.5

    def detect(self, image: np.ndarray, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One box per query: ``(boxes float [K, 4] as pixel (x0, y0, x1, y1), scores float [K] in [0, 1])``.

        Raises :class:`SubjectNotFound` when a query's best remaining box scores under ``min_score``.
        """
        from PIL import Image

        h, w = image.shape[:2]
        inputs = self.det_processor(text=[list(queries)], images=[Image.fromarray(image)], return_tensors="pt")
        with torch.no_grad():
            out = self.detector(**{k: v.to(self.device) for k, v in inputs.items()})
        logits = out.logits[0].double().cpu().numpy()  # [P, K]
        padded = self.detector.config.model_type == "owlv2"  # OWLv2 pads to a square before resizing
        boxes = cxcywh_to_pixels(out.pred_boxes[0].float().cpu().numpy(), h, w, padded)  # [P, 4]
        return pick_boxes(boxes, logits, queries, self.min_score, self.max_iou)

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """bool ``[K, H, W]``: the segmenter's mask for each box (single-mask output), kept inside its box."""
        from PIL import Image

        from focusdpo.data.masks import _keep_in_boxes

        inputs = self.seg_processor(images=[Image.fromarray(image)], input_boxes=[boxes.tolist()],
                                    return_tensors="pt")
        with torch.no_grad():
            out = self.segmenter(pixel_values=inputs["pixel_values"].to(self.device),
                                 input_boxes=inputs["input_boxes"].to(self.device), multimask_output=False)
        masks = self.seg_processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"],
                                                      inputs["reshaped_input_sizes"])[0]  # [K, 1, H, W] bool
        return _keep_in_boxes(masks[:, 0].numpy().astype(bool), [tuple(b) for b in boxes.tolist()])

    def masks(self, image: np.ndarray, queries: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(masks bool [K, H, W], boxes [K, 4], scores [K])`` of the subjects named by ``queries``, in order."""
        boxes, scores = self.detect(image, queries)
        return self.segment(image, boxes), boxes, scores


def cxcywh_to_pixels(boxes: np.ndarray, h: int, w: int, padded: bool) -> np.ndarray:
    """Normalised ``(cx, cy, bw, bh)`` ``[P, 4]`` -> pixel ``(x0, y0, x1, y1)`` clipped to the ``h x w`` image.

    ``padded``: the coordinates are relative to the image padded to a ``max(h, w)`` square at the bottom/right
    (OWLv2's preprocessing); else relative to the image itself (OWL-ViT resizes without padding).
    """
    sx, sy = (max(h, w), max(h, w)) if padded else (w, h)
    cx, cy, bw, bh = boxes[:, 0] * sx, boxes[:, 1] * sy, boxes[:, 2] * sx, boxes[:, 3] * sy
    out = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    return np.clip(out, 0, [w, h, w, h])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two pixel boxes ``(x0, y0, x1, y1)``."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def pick_boxes(boxes: np.ndarray, logits: np.ndarray, queries: list[str], min_score: float,
               max_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """One box per query from ``boxes`` ``[P, 4]`` and the detector's ``logits`` ``[P, K]`` (module docstring: best
    pair first, no box overlapping a taken one by IoU > ``max_iou``). Returns ``(boxes [K, 4], scores [K])`` in
    query order, scores = sigmoid(logits) in [0, 1]. Pairs are ranked by logits: their sigmoid saturates (ties)."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -500, 500)))
    k = scores.shape[1]
    chosen: dict[int, int] = {}
    flat_boxes = (boxes[:, 2] - boxes[:, 0] < 1) | (boxes[:, 3] - boxes[:, 1] < 1)  # under a pixel: no subject
    for flat in np.argsort(-logits, axis=None, kind="stable"):
        p, q = divmod(int(flat), k)
        if q in chosen or flat_boxes[p] or any(box_iou(boxes[p], boxes[c]) > max_iou for c in chosen.values()):
            continue
        chosen[q] = p
        if len(chosen) == k:
            break
    missing = [q for q in range(k) if q not in chosen or scores[chosen[q], q] < min_score]
    if missing:
        best = {queries[q]: round(float(scores[chosen[q], q]), 3) if q in chosen else None for q in missing}
        raise SubjectNotFound(f"the detector found no box for {best} (best score under "
                              f"data.mask_min_score={min_score})")
    idx = [chosen[q] for q in range(k)]
    return boxes[idx], scores[idx, list(range(k))]


def load_detector(detector: str, device: str = "cpu", min_score: float = 0.1,
                  field: str = "eval.confusion_detector") -> MaskModels:
    """The detector alone (boxes, no masks: ``segmenter`` None), e.g. for the identity-confusion regions of
    ``focusdpo eval``; :class:`MaskModelsUnavailable` with the reason."""
    det, det_proc = _load(detector, field, DETECTOR_TYPES, "zero-shot-detection")
    try:
        det = det.to(device).eval()
    except Exception as e:  # noqa: BLE001 - e.g. a device that does not exist here
        raise MaskModelsUnavailable(f"cannot move the detector to {device!r} ({type(e).__name__}: {e})") from e
    return MaskModels(det, det_proc, None, None, device, min_score)


def load_mask_models(detector: str, segmenter: str, device: str = "cpu", min_score: float = 0.1) -> MaskModels:
    """Load the detector and segmenter (module docstring); :class:`MaskModelsUnavailable` with the reason."""
    det, det_proc = _load(detector, "data.mask_detector", DETECTOR_TYPES, "zero-shot-detection")
    seg, seg_proc = _load(segmenter, "data.mask_segmenter", SEGMENTER_TYPES, "mask-generation")
    try:
        det, seg = det.to(device).eval(), seg.to(device).eval()
    except Exception as e:  # noqa: BLE001 - e.g. a device that does not exist here
        raise MaskModelsUnavailable(f"cannot move the mask models to data.mask_device={device!r} "
                                    f"({type(e).__name__}: {e})") from e
    return MaskModels(det, det_proc, seg, seg_proc, device, min_score)


def _load(name: str, field: str, types: tuple[str, ...], task: str) -> tuple[Any, Any]:
    """Model and processor of ``name``: the local cache first, then the Hub unless offline."""
    from huggingface_hub import constants  # HF_HUB_OFFLINE: read at call time, on old and new hub clients

    try:
        return _from_pretrained(name, types, field, task, local_only=True)
    except MaskModelsUnavailable:
        raise
    except Exception as local_err:  # noqa: BLE001 - not a folder and not cached: maybe downloadable
        if constants.HF_HUB_OFFLINE:
            raise MaskModelsUnavailable(f"{field}={name!r} is neither a local folder nor in the Hugging Face cache "
                                        f"and HF_HUB_OFFLINE is set ({type(local_err).__name__}); download it "
                                        f"first (`hf download {name}`)") from local_err
    try:
        return _from_pretrained(name, types, field, task, local_only=False)
    except MaskModelsUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - no network, unknown id, gated repo, broken files...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise MaskModelsUnavailable(f"{field}={name!r} cannot be loaded ({type(e).__name__}: {first}); give a "
                                    f"local folder or a hub id you can download (`hf download {name}`)") from e


def _from_pretrained(name: str, types: tuple[str, ...], field: str, task: str, local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoProcessor

    cfg = AutoConfig.from_pretrained(name, local_files_only=local_only)
    if cfg.model_type not in types:
        raise MaskModelsUnavailable(f"{field}={name!r} is a {cfg.model_type!r} model; allowed: "
                                    f"{', '.join(types)}")
    if task == "zero-shot-detection":
        from transformers import AutoModelForZeroShotObjectDetection as auto
    else:
        from transformers import AutoModelForMaskGeneration as auto
    model = auto.from_pretrained(name, local_files_only=local_only, use_safetensors=True)
    return model, AutoProcessor.from_pretrained(name, local_files_only=local_only)
