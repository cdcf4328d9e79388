"""The DIP record (DESIGN 2.7): one Disrupted-Instance Pair and everything needed to train on it.

A record holds numpy arrays at full resolution, exactly as stored in the Parquet shards (see
:mod:`focusdpo.data.parquet`); the training Dataset (:mod:`focusdpo.data.dataset`) turns them into tensors.

Invariant checked by :meth:`DipRecord.validate`: the negative equals the positive at every pixel outside
``m_prior`` (exactly, uint8), and ``m_prior`` is the union of the disrupted subjects' regions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RecordError(ValueError):
    """A record is malformed; the message names the record and the field."""


@dataclass
class DipRecord:
    """One DIP pair.

    Attributes:
        id: unique record id (string).
        prompt: the text prompt.
        positive: uint8 ``[H, W, 3]``, keeps every subject's identity.
        negative: uint8 ``[H, W, 3]``, equal to ``positive`` outside ``m_prior``.
        regions: bool ``[K, H, W]``, ``P_k`` of each subject in the positive, in reference order.
        m_prior: bool ``[H, W]``, exactly the pixels the disruption may change (union of disrupted ``P_k``).
        references: K uint8 ``[h_k, w_k, 3]`` reference images.
        ref_masks: K bool ``[h_k, w_k]`` subject masks of the references (all True when unknown).
        m_d: float32 ``[H / m_d_patch, W / m_d_patch]`` in [0, 1], DPCE complexity of the positive (unmasked).
        m_d_patch: pixels per token side used for ``m_d``.
        disruption: name of the applied disruption (see :mod:`focusdpo.data.disruptions`).
        disrupted: indices (reference order) of the disrupted subjects.
        params: JSON-serialisable parameters of the disruption (e.g. source subject, blur radius).
        source: JSON-serialisable provenance (builder, seed, record index, identity ids or file paths).
    """

    id: str
    prompt: str
    positive: np.ndarray
    negative: np.ndarray
    regions: np.ndarray
    m_prior: np.ndarray
    references: list[np.ndarray]
    ref_masks: list[np.ndarray]
    m_d: np.ndarray
    m_d_patch: int
    disruption: str
    disrupted: list[int]
    params: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_subjects(self) -> int:
        """K, the number of subjects (= references)."""
        return int(self.regions.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the positive."""
        return int(self.positive.shape[0]), int(self.positive.shape[1])

    def validate(self) -> None:
        """Check dtypes, shapes and the pair invariant; raise :class:`RecordError` naming the record."""
        _check_image(self, "positive", self.positive)
        _check_image(self, "negative", self.negative)
        h, w = self.size
        _expect(self, self.negative.shape == self.positive.shape, "negative",
                f"shape {self.negative.shape} differs from positive {self.positive.shape}")
        _expect(self, self.regions.dtype == bool and self.regions.ndim == 3 and self.regions.shape[1:] == (h, w),
                "regions", f"must be bool [K, {h}, {w}], got {self.regions.dtype} {self.regions.shape}")
        k = self.num_subjects
        _expect(self, k >= 1, "regions", "needs at least one subject")
        _expect(self, bool(self.regions.reshape(k, -1).any(axis=1).all()), "regions", "a subject region is empty")
        _expect(self, self.m_prior.dtype == bool and self.m_prior.shape == (h, w), "m_prior",
                f"must be bool [{h}, {w}], got {self.m_prior.dtype} {self.m_prior.shape}")
        _expect(self, len(self.references) == k and len(self.ref_masks) == k, "references",
                f"need {k} references and ref_masks, got {len(self.references)} and {len(self.ref_masks)}")
        for i, (ref, mask) in enumerate(zip(self.references, self.ref_masks, strict=True)):
            _check_image(self, f"references[{i}]", ref)
            _expect(self, mask.dtype == bool and mask.shape == ref.shape[:2], f"ref_masks[{i}]",
                    f"must be bool {ref.shape[:2]}, got {mask.dtype} {mask.shape}")
        _expect(self, all(0 <= s < k for s in self.disrupted) and len(self.disrupted) >= 1, "disrupted",
                f"indices {self.disrupted} must be in [0, {k})")
        union = self.regions[list(self.disrupted)].any(axis=0)
        _expect(self, np.array_equal(union, self.m_prior), "m_prior", "is not the union of the disrupted regions")
        outside = ~self.m_prior
        _expect(self, np.array_equal(self.negative[outside], self.positive[outside]), "negative",
                "differs from the positive outside m_prior")
        p = self.m_d_patch
        _expect(self, p >= 1 and h % p == 0 and w % p == 0, "m_d_patch", f"{p} must divide the size {(h, w)}")
        _expect(self, self.m_d.dtype == np.float32 and self.m_d.shape == (h // p, w // p), "m_d",
                f"must be float32 [{h // p}, {w // p}], got {self.m_d.dtype} {self.m_d.shape}")
        _expect(self, bool(np.all((self.m_d >= 0) & (self.m_d <= 1))), "m_d", "values must lie in [0, 1]")


def _expect(rec: DipRecord, cond: bool, name: str, what: str) -> None:
    if not cond:
        raise RecordError(f"record {rec.id!r}: {name} {what}")


def _check_image(rec: DipRecord, name: str, img: np.ndarray) -> None:
    _expect(rec, isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3,
            name, f"must be uint8 [H, W, 3], got {getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
