"""What a world holds (attribute counts, identities, split) and a preview sheet of its scenes.

Used by ``focusdpo world`` to show a user the built-in data before anything is trained on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from focusdpo.world.scenes import World
from focusdpo.world.subjects import BACKGROUNDS, CLASSES, COLOUR_FAMILIES, COLOURS, DETAILS, PATTERNS, all_combinations


def describe(world: World) -> dict[str, Any]:
    """Counts per attribute, identities and split sizes of ``world`` (JSON-serialisable)."""
    ids = world.identities
    train_triples = {(ids[i].cls, ids[i].body, ids[i].pattern) for i in world.train_ids}
    unseen = sum((ids[i].cls, ids[i].body, ids[i].pattern) not in train_triples for i in world.heldout_ids)
    return {
        "classes": list(CLASSES), "body_colours": list(COLOURS), "colour_families": len(COLOUR_FAMILIES),
        "patterns": list(PATTERNS), "pattern_colours_per_body": len(COLOURS) - 1, "details": list(DETAILS),
        "backgrounds": list(BACKGROUNDS), "combinations": len(all_combinations()), "identities": len(ids),
        "train": len(world.train_ids), "heldout": len(world.heldout_ids),
        "heldout_unseen_class_body_pattern": unseen, "heldout_unseen_tuple_only": len(world.heldout_ids) - unseen,
        "scene_size": world.cfg.scene_size, "ref_size": world.cfg.ref_size,
        "vocabulary": len(world.vocabulary()),
    }


def preview_sheet(world: World, rng: np.random.Generator, n_scenes: int = 8, split: str = "train",
                  scale: int = 4) -> tuple[np.ndarray, list[str]]:
    """A contact sheet: one row per scene (the scene, then its references in reference order), subject counts
    cycling through ``min_subjects..max_subjects``, upscaled ``scale`` times (nearest neighbour).

    Returns ``(uint8 [H, W, 3], prompts)`` with one prompt per row.
    """
    if n_scenes < 1 or scale < 1:
        raise ValueError(f"n_scenes={n_scenes}, scale={scale} are invalid: both must be >= 1")
    s, r = world.cfg.scene_size, world.cfg.ref_size
    counts = list(range(world.cfg.min_subjects, world.cfg.max_subjects + 1))
    width = s + world.cfg.max_subjects * (r + 2) + 2
    rows, prompts = [], []
    for i in range(n_scenes):
        scene = world.sample_scene(rng, split, counts[i % len(counts)])
        row = np.full((s + 2, width, 3), 255, dtype=np.uint8)
        row[1:s + 1, 1:s + 1] = scene.image
        for k, ref in enumerate(scene.references):
            x = s + 2 + k * (r + 2)
            row[1:r + 1, x + 1:x + r + 1] = ref
        rows.append(row)
        prompts.append(scene.prompt)
    sheet = np.concatenate(rows, axis=0)
    return sheet.repeat(scale, axis=0).repeat(scale, axis=1), prompts
