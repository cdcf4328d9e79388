"""Subject attributes of the synthetic world and the identities built from them.

An identity is a tuple of five attributes (DESIGN section 4):

- ``cls``: the silhouette class; its name is the noun used in prompts ("a ring on the left ...");
- ``body``: the body colour (a saturated palette colour);
- ``pattern``: a coarse periodic pattern (period 4-5 pattern units, one unit = 1 px at the default size);
- ``pattern_colour``: the colour of the pattern (a palette colour different from the body colour);
- ``detail``: a small (2-3 unit) black or white mark at a class-specific spot.

Colours are chosen so that no body or pattern colour is close to a background colour or to the mark colours
(minimum RGB distance about 85), which lets the toy metrics decode every attribute from pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name -> (spot of the detail mark in normalised subject coordinates (u, v), v pointing down).
# Every silhouette spans the box [-1, 1]^2 of its subject frame (see render.shape_mask).
CLASSES: dict[str, tuple[float, float]] = {
    "ball": (0.35, -0.35),
    "box": (-0.45, -0.45),
    "cone": (0.0, 0.45),
    "gem": (0.0, 0.0),
    "cross": (0.0, 0.0),
    "ring": (0.0, -0.7),
}

# Subject colours (body and pattern), saturated so that they never look like a muted background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 30),
    "green": (40, 170, 60),
    "cyan": (20, 190, 200),
    "blue": (40, 70, 215),
    "purple": (145, 55, 195),
    "pink": (245, 110, 185),
    "brown": (125, 70, 35),
}

# Colour families: near colours, so that two subjects of one family are easy to confuse (leakage-prone).
COLOUR_FAMILIES: dict[str, tuple[str, ...]] = {
    "reds": ("red", "pink"),
    "oranges": ("orange", "yellow", "brown"),
    "greens": ("green", "cyan"),
    "blues": ("blue", "purple"),
}

# Mark colours: white on dark bodies, black on light ones (luminance threshold 140).
MARK_COLOURS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "black": (15, 15, 15)}

# name -> period in pattern units. Each pattern covers 25-36% of the body so the body colour stays dominant.
PATTERNS: dict[str, int] = {"stripes": 4, "bands": 4, "dots": 4, "diagonal": 4, "grid": 5}

DETAILS: tuple[str, ...] = ("dot", "hbar", "vbar")

# Muted backgrounds named in prompts ("... on sand"); textured slightly at render time.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grass": (120, 150, 100),
    "sand": (205, 185, 140),
    "snow": (200, 205, 215),
    "sky": (150, 185, 215),
    "stone": (140, 135, 130),
}

# The plain background of reference images.
REFERENCE_BACKGROUND: tuple[int, int, int] = (190, 190, 190)


def colour_family(colour: str) -> str:
    """Name of the family of a subject colour (see ``COLOUR_FAMILIES``)."""
    for family, members in COLOUR_FAMILIES.items():
        if colour in members:
            return family
    raise ValueError(f"unknown colour {colour!r}: expected one of {', '.join(COLOURS)}")


def mark_colour(body: str) -> str:
    """Name of the detail-mark colour on a body colour: ``"white"`` on dark bodies, ``"black"`` on light."""
    r, g, b = COLOURS[body]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "black"


@dataclass(frozen=True)
class Identity:
    """One procedural subject. ``id`` is its index in ``World.identities``; ``cls`` is also its prompt noun."""

    id: int
    cls: str
    body: str
    pattern: str
    pattern_colour: str
    detail: str

    @property
    def noun(self) -> str:
        """The word prompts use for this subject."""
        return self.cls

    @property
    def attributes(self) -> dict[str, str]:
        """The identity-defining attributes by name (``class, body, pattern, pattern_colour, detail``)."""
        return {"class": self.cls, "body": self.body, "pattern": self.pattern,
                "pattern_colour": self.pattern_colour, "detail": self.detail}


def all_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every valid attribute tuple ``(cls, body, pattern, pattern_colour, detail)`` in a fixed order."""
    return [(c, b, p, pc, d) for c in CLASSES for b in COLOURS for p in PATTERNS
            for pc in COLOURS if pc != b for d in DETAILS]


def make_identities(n: int, rng: np.random.Generator) -> list[Identity]:
    """``n`` distinct identities drawn without replacement from all attribute combinations."""
    combos = all_combinations()
    if not 1 <= n <= len(combos):
        raise ValueError(f"n_identities={n} is invalid: the world has {len(combos)} attribute combinations; "
                         f"ask for 1..{len(combos)}")
    picks = rng.choice(len(combos), size=n, replace=False)
    return [Identity(i, *combos[j]) for i, j in enumerate(picks)]


def split_identities(identities: list[Identity], heldout_fraction: float,
                     rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Split identities into disjoint ``(train_ids, heldout_ids)``, both sorted.

    About half of the held-out identities come from whole ``(cls, body, pattern)`` triples removed from
    training (combinations never seen in training); the rest are single identities whose triple stays in
    training (unseen full tuples of seen triples).
    """
    n = len(identities)
    n_held = min(max(1, round(heldout_fraction * n)), n - 1)
    by_triple: dict[tuple[str, str, str], list[int]] = {}
    for ident in identities:
        by_triple.setdefault((ident.cls, ident.body, ident.pattern), []).append(ident.id)
    triples = list(by_triple)
    held: set[int] = set()
    for t in rng.permutation(len(triples)):
        members = by_triple[triples[t]]
        if len(held) + len(members) > n_held // 2:
            continue
        held.update(members)
    # Single identities from triples that keep at least one other member in training.
    candidates = [i for t, members in by_triple.items() if len(set(members) - held) >= 2
                  for i in members if i not in held]
    for i in rng.permutation(candidates):
        if len(held) >= n_held:
            break
        triple = (identities[i].cls, identities[i].body, identities[i].pattern)
        if len(set(by_triple[triple]) - held) >= 2:
            held.add(int(i))
    # Small worlds may have too few shared triples: fill up with any identities (more unseen triples).
    for i in rng.permutation(n):
        if len(held) >= n_held:
            break
        held.add(int(i))
    train = sorted(set(range(n)) - held)
    return train, sorted(held)
