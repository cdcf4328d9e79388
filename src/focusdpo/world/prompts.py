"""Scene layouts and the prompts that describe them.

A scene of K subjects has K *slots* (left/right for 2, left/middle/right for 3, middle for 1). The prompt
mentions the subjects in reference order, each with its slot:
``"a ring on the right and a box on the left on sand"``. The mention order is shuffled against the slots,
so only the prompt's nouns and position words bind a reference to its place.
"""

from __future__ import annotations

from focusdpo.world.subjects import BACKGROUNDS, CLASSES

# Position words per subject count, left to right, with the horizontal slot centre (fraction of the side).
SLOTS: dict[int, tuple[tuple[str, float], ...]] = {
    1: (("middle", 0.5),),
    2: (("left", 0.27), ("right", 0.73)),
    3: (("left", 0.18), ("middle", 0.5), ("right", 0.82)),
}

# Subject size range (fraction of the side) per subject count: ~11-15 px in 2-subject scenes at 32 px.
SIZES: dict[int, tuple[float, float]] = {1: (0.45, 0.55), 2: (0.36, 0.46), 3: (0.27, 0.33)}

_PHRASE = {"left": "on the left", "right": "on the right", "middle": "in the middle"}


def slot_words(n_subjects: int) -> list[str]:
    """Position words of a scene of ``n_subjects``, left to right."""
    if n_subjects not in SLOTS:
        raise ValueError(f"n_subjects={n_subjects} is invalid: the world draws 1, 2 or 3 subjects")
    return [w for w, _ in SLOTS[n_subjects]]


def slot_centre(n_subjects: int, position: str) -> float:
    """Horizontal centre (fraction of the side) of slot ``position`` in a scene of ``n_subjects``."""
    for word, cx in SLOTS[n_subjects]:
        if word == position:
            return cx
    raise ValueError(f"position {position!r} is invalid for {n_subjects} subjects: expected one of "
                     f"{', '.join(slot_words(n_subjects))}")


def compose_prompt(nouns: list[str], positions: list[str], background: str) -> str:
    """The prompt naming each subject (in reference order) with its position and the background."""
    if len(nouns) != len(positions) or not nouns:
        raise ValueError(f"nouns {nouns} and positions {positions} must be non-empty and of equal length")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}: expected one of {', '.join(BACKGROUNDS)}")
    parts = [f"a {noun} {_PHRASE[pos]}" for noun, pos in zip(nouns, positions, strict=True)]
    return " and ".join(parts) + f" on {background}"


def parse_prompt(prompt: str) -> tuple[list[str], list[str], str]:
    """Inverse of :func:`compose_prompt`: ``(nouns, positions, background)``."""
    words = prompt.split()
    if len(words) < 2 or words[-2] != "on" or words[-1] not in BACKGROUNDS:
        raise ValueError(f"prompt {prompt!r} does not end in 'on <background>' with a known background")
    nouns, positions = [], []
    for part in " ".join(words[:-2]).split(" and "):
        tokens = part.split()
        if len(tokens) < 3 or tokens[0] != "a" or tokens[1] not in CLASSES or tokens[-1] not in _PHRASE:
            raise ValueError(f"prompt {prompt!r}: cannot parse {part!r} as 'a <noun> on the <position>'")
        nouns.append(tokens[1])
        positions.append(tokens[-1])
    return nouns, positions, words[-1]


def vocabulary() -> list[str]:
    """Every word a prompt can contain, sorted."""
    words = {"a", "and", "on", "the", "in"} | set(_PHRASE) | set(CLASSES) | set(BACKGROUNDS)
    return sorted(words)
