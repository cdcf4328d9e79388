"""Shared fixtures of the data tests: small synthetic scenes built without the world."""

from __future__ import annotations

import numpy as np

from focusdpo.data.disruptions import DisruptionContext, apply_disruption
from focusdpo.data.records import DipRecord


def make_scene(seed: int = 0, k: int = 2, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background with K textured discs of distinct colours: (uint8 [S,S,3], bool [K,S,S])."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    regions = np.zeros((k, size, size), bool)
    centres = [(size // 4 + 1, size // 4 + 1), (3 * size // 4 - 1, 3 * size // 4 - 1), (size // 4 + 1, 3 * size // 4)]
    for i in range(k):
        cy, cx = centres[i]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2
        colour = rng.integers(80, 255, 3)
        stripes = ((xx + yy + i) % 4 < 2)[..., None] * rng.integers(0, 70, 3)
        img[disc] = np.clip(colour + stripes, 0, 255).astype(np.uint8)[disc]
        regions[i] = disc
    return img, regions


def make_record(seed: int = 0, k: int = 2, name: str = "detail_erase", patch: int = 2) -> DipRecord:
    """A valid record of the synthetic scene with the disruption ``name`` applied."""
    img, regions = make_scene(seed, k)
    rng = np.random.default_rng(seed)
    refs = [img[:16, :16].copy() for _ in range(k)]
    masks = [np.ones((16, 16), bool) for _ in range(k)]
    res = apply_disruption(name, img, regions, rng, DisruptionContext(refs, masks, "p"))
    h = img.shape[0] // patch
    return DipRecord(id=f"r{seed}", prompt=f"prompt {seed}", positive=img, negative=res.negative, regions=regions,
                     m_prior=res.m_prior, references=refs, ref_masks=masks,
                     m_d=rng.random((h, h), dtype=np.float32), m_d_patch=patch, disruption=name,
                     disrupted=res.subjects, params=res.params, source={"seed": seed})


