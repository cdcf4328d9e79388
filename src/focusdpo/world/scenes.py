"""The synthetic world: identities, their train/held-out split, references and multi-subject scenes.

Everything is deterministic: the identities and the split depend only on ``WorldConfig.seed``; references and
scenes depend only on the ``np.random.Generator`` passed in (and the world). Scenes are built to make
attribute leakage *possible*, otherwise post-training has nothing to fix: the reference order is shuffled
against the positions (only the prompt binds a reference to its place), two subjects may share a class or a
body-colour family (``WorldConfig.share_prob``), and neighbours may touch or overlap slightly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from focusdpo.config import WorldConfig
from focusdpo.world import prompts
from focusdpo.world.render import Placement, background_image, composite
from focusdpo.world.subjects import (
    BACKGROUNDS,
    COLOURS,
    MARK_COLOURS,
    REFERENCE_BACKGROUND,
    Identity,
    colour_family,
    make_identities,
    split_identities,
)

SPLITS = ("train", "heldout")


@dataclass
class Scene:
    """One multi-subject scene with its ground truth; every per-subject list is in reference order, which is
    the order in which the prompt mentions the subjects.

    ``image``: uint8 [S, S, 3]; ``masks``: bool [K, S, S] (visible pixels, disjoint);
    ``references``: K x uint8 [R, R, 3]; ``ref_masks``: K x bool [R, R]; ``positions``: K slot words.
    """

    prompt: str
    identities: list[Identity]
    positions: list[str]
    background: str
    placements: list[Placement]
    image: np.ndarray
    masks: np.ndarray
    references: list[np.ndarray]
    ref_masks: list[np.ndarray]


class World:
    """The built-in synthetic world of ``cfg`` (see ``focusdpo.config.WorldConfig``)."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.identities: list[Identity] = make_identities(cfg.n_identities, rng)
        self.train_ids, self.heldout_ids = split_identities(self.identities, cfg.heldout_fraction, rng)
        self.palette: dict[str, tuple[int, int, int]] = {
            **COLOURS, **MARK_COLOURS, **BACKGROUNDS, "reference": REFERENCE_BACKGROUND}
        # Pattern units: 1 px at the default sizes (32 px scenes, 16 px references).
        self.scene_unit = cfg.scene_size / 32
        self.ref_unit = cfg.ref_size / 16

    def split_ids(self, split: str) -> list[int]:
        """Identity ids of ``split`` (``"train"`` or ``"heldout"``)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: expected 'train' or 'heldout'")
        return self.train_ids if split == "train" else self.heldout_ids

    def vocabulary(self) -> list[str]:
        """Every word a prompt can contain, sorted."""
        return prompts.vocabulary()

    def render_reference(self, identity: Identity, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The subject alone on the plain reference background, with pose (+-10 deg) and scale jitter.

        Returns ``(image uint8 [R, R, 3], mask bool [R, R])``.
        """
        side = self.cfg.ref_size
        placement = Placement(cx=0.5 + rng.uniform(-0.04, 0.04), cy=0.5 + rng.uniform(-0.04, 0.04),
                              size=rng.uniform(0.6, 0.75), angle=rng.uniform(-10.0, 10.0))
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = REFERENCE_BACKGROUND
        masks = composite(canvas, [identity], [placement], self.ref_unit)
        return canvas, masks[0]

    def render_scene(self, identities: list[Identity], placements: list[Placement],
                     background: str) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``identities`` at ``placements`` on ``background``.

        Returns ``(image uint8 [S, S, 3], masks bool [K, S, S])``, masks in the order of ``identities``.
        Re-rendering a scene's placements with one identity replaced changes only that subject's pixels
        (and what it occludes).
        """
        canvas = background_image(background, self.cfg.scene_size, self.cfg.seed)
        masks = composite(canvas, identities, placements, self.scene_unit)
        return canvas, masks

    def sample_placements(self, rng: np.random.Generator, positions: list[str]) -> list[Placement]:
        """Placements for subjects at slot words ``positions`` (reference order): size, small horizontal and
        vertical jitter, and a random draw order."""
        k = len(positions)
        lo, hi = prompts.SIZES[k]
        jitter = 0.015 if k == 3 else 0.03
        layers = rng.permutation(k)
        return [Placement(cx=prompts.slot_centre(k, pos) + rng.uniform(-jitter, jitter),
                          cy=0.5 + rng.uniform(-0.1, 0.1), size=rng.uniform(lo, hi), layer=int(layers[i]))
                for i, pos in enumerate(positions)]

    def sample_identities(self, rng: np.random.Generator, split: str, n: int) -> list[Identity]:
        """``n`` distinct identities of ``split``; each after the first shares the class or the body-colour family
        of an earlier one with probability ``cfg.share_prob`` (when the split has such an identity)."""
        pool = self.split_ids(split)
        if n > len(pool):
            raise ValueError(f"n_subjects={n} is more than the {len(pool)} identities of split {split!r}")
        chosen = [int(rng.choice(pool))]
        while len(chosen) < n:
            free = [i for i in pool if i not in chosen]
            if rng.random() < self.cfg.share_prob:
                anchor = self.identities[chosen[int(rng.integers(len(chosen)))]]
                if rng.random() < 0.5:
                    same = [i for i in free if self.identities[i].cls == anchor.cls]
                else:
                    family = colour_family(anchor.body)
                    same = [i for i in free if colour_family(self.identities[i].body) == family]
                free = same or free
            chosen.append(int(rng.choice(free)))
        return [self.identities[i] for i in chosen]

    def sample_scene(self, rng: np.random.Generator, split: str = "train", n_subjects: int = 2) -> Scene:
        """A random scene of ``n_subjects`` identities of ``split``, with references and ground truth."""
        slots = prompts.slot_words(n_subjects)
        identities = self.sample_identities(rng, split, n_subjects)
        positions = [slots[i] for i in rng.permutation(n_subjects)]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        placements = self.sample_placements(rng, positions)
        image, masks = self.render_scene(identities, placements, background)
        refs = [self.render_reference(ident, rng) for ident in identities]
        prompt = prompts.compose_prompt([i.noun for i in identities], positions, background)
        return Scene(prompt=prompt, identities=identities, positions=positions, background=background,
                     placements=placements, image=image, masks=masks, references=[r[0] for r in refs],
                     ref_masks=[r[1] for r in refs])
