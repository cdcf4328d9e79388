"""Chance leakage and transfer: leakage toward identities not in the scene, and what the scene carried over."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from focusdpo.config import load_config
from focusdpo.world import World
from focusdpo.world.embedding import plant_leak
from focusdpo.world.metrics import CHANCE_DECOYS, chance_decoys, score_scene


@pytest.fixture(scope="module")
def scenes(world):
    rng = np.random.default_rng(3)
    return [world.sample_scene(rng, "heldout", 2) for _ in range(30)]


def test_decoys_are_fixed_by_the_world(world):
    d = chance_decoys(world)
    assert len(d) == CHANCE_DECOYS and len({i.id for i in d}) == CHANCE_DECOYS
    assert [i.id for i in chance_decoys(World(load_config(None, []).world))] == [i.id for i in d]


def test_truth_has_no_chance_leakage_and_no_transfer(world, scenes):
    for s in scenes:
        out = score_scene(s.image, s, world)
        assert out["leakage_chance"] == pytest.approx(0.0, abs=0.02) and out["transfer"] == pytest.approx(0.0, abs=0.02)


def test_a_class_copied_from_the_co_subject_is_transfer(world, scenes):
    """Subject 0 drawn with subject 1's class: class leakage 1, chance = the decoys' share of that class among
    those of another class than subject 0's; transfer = leakage - chance, clearly positive."""
    seen = 0
    for s in scenes:
        a, b = s.identities
        if a.cls == b.cls:
            continue
        out = score_scene(plant_leak(world, s, 0, 1, ["class"]).image, s, world)["subjects"][0]
        if out["read"]["class"] != b.cls:
            continue  # the reader did not see the planted class (occlusion): nothing to check here
        seen += 1
        assert out["leakage"]["class"] == 1.0
        valid = [v for v in out["leakage"].values() if not np.isnan(v)]
        assert out["leakage_mean"] == pytest.approx(np.mean(valid))
        decoys = [d for d in chance_decoys(world) if d.id not in (a.id, b.id) and d.cls != a.cls]
        expected_class = np.mean([d.cls == b.cls for d in decoys])
        assert 0 < expected_class < 0.5
        assert out["transfer"] > 0.1 and out["leakage_chance"] < out["leakage_mean"]
    assert seen >= 10


def test_a_class_from_outside_the_scene_is_chance_not_transfer(world, scenes):
    """Subject 0 drawn with the class of an identity that is in no subject of the scene: no class leakage (the
    co-subject has another class), positive chance leakage, so negative transfer."""
    seen = 0
    for s in scenes:
        a, b = s.identities
        if a.cls == b.cls:
            continue  # class leakage is not scored for two subjects of one class
        foreign = next(c for c in ("ball", "box", "cone", "gem", "cross", "ring") if c not in (a.cls, b.cls))
        image, _ = world.render_scene([replace(a, cls=foreign), b], s.placements, s.background)
        out = score_scene(image, s, world)["subjects"][0]
        if out["read"]["class"] != foreign or np.isnan(out["leakage_mean"]):
            continue
        seen += 1
        assert out["leakage"]["class"] == 0.0
        assert out["leakage_chance"] > 0 and out["transfer"] < 0
    assert seen >= 10
