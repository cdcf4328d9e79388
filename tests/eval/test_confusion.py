"""The identity-confusion metric of `focusdpo eval` on the toy benchmark (issue 16 point 3)."""

from __future__ import annotations

import pytest

from focusdpo.config import load_config
from focusdpo.eval.toy import confusion_agreement, confusion_markdown, heldout_scenes, identity_confusion, slot_regions
from focusdpo.world import World


@pytest.fixture(scope="module")
def world_scenes():
    cfg = load_config(None, [])
    world = World(cfg.world)
    return world, heldout_scenes(world, 8, [2, 3])


def test_slot_regions_are_the_prompt_strips():
    regions = slot_regions(["left", "right"], 32)
    assert regions.shape == (2, 32, 32) and not (regions[0] & regions[1]).any() and (regions[0] | regions[1]).all()
    assert regions[0, :, 0].all() and regions[1, :, -1].all()


def test_truth_is_not_confused_and_rotated_identities_are(world_scenes):
    world, scenes = world_scenes
    for ks in scenes.values():
        for s in ks:
            truth = identity_confusion(s.image, s)
            assert truth["confusion"] == 0.0 and truth["own_sim"] == pytest.approx(truth["matched_sim"])
            rotated, _ = world.render_scene(s.identities[1:] + s.identities[:1], s.placements, s.background)
            bad = identity_confusion(rotated, s)
            assert bad["confusion"] == 1.0 and bad["own_sim"] < truth["own_sim"]


def _entry(confusion, leakage, own):
    n = len(confusion)
    return {"units": {"keys": [[2, 0, 0, i] for i in range(n)], "confusion": confusion, "leakage": leakage,
                      "own_sim": own, "matched_sim": [1.0] * n, "fidelity": [0.5] * n, "prompt": [0.5] * n}}


def test_agreement_known_values():
    metrics = {"a": _entry([0, 0, 0, 1], [0.0, 0.1, 0.0, 0.2], [0.9, 0.9, 0.9, 0.5]),
               "b": _entry([0, 1, 1, 1], [0.1, 0.3, 0.2, 0.4], [0.9, 0.6, 0.6, 0.5]),
               "c": _entry([1, 1, 1, 1], [0.5, 0.4, 0.5, 0.6], [0.4, 0.4, 0.4, 0.4]),
               "old": {"fidelity": {}}}  # an entry without units is skipped
    out = confusion_agreement(metrics)
    assert out["n_methods"] == 3 and out["methods"]["b"]["confusion"] == pytest.approx(0.75)
    assert out["over_methods"]["confusion"] == pytest.approx(1.0)
    assert out["over_methods"]["neg_own_sim"] == pytest.approx(1.0)
    assert out["over_units"]["n"] == 12 and out["over_units"]["confusion"] > 0.7
    assert out["over_scenes"]["n"] == 4
    assert "| b | 0.750 |" in confusion_markdown(out)
