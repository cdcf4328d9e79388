"""The built-in synthetic world: procedural subjects, multi-subject scenes, prompts and ground truth.

``World(cfg.world)`` holds the identities and their train/held-out split; ``sample_scene`` draws a scene with
its prompt, references, exact per-subject masks and attribute labels (see ``docs/architecture.md``).
"""

from focusdpo.world.render import Placement
from focusdpo.world.scenes import Scene, World
from focusdpo.world.subjects import Identity

__all__ = ["Identity", "Placement", "Scene", "World"]
