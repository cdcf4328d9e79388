"""The toy world's identity embedding (the confusion metric's stand-in for DINO) and planted leaks."""

from __future__ import annotations

import numpy as np
import pytest

from focusdpo.eval.toy import slot_regions
from focusdpo.judges import assign_image, bbox_crop, colour_embedder
from focusdpo.world.embedding import BLOCKS, plant_leak, subject_embedder, subject_features, subject_mask
from focusdpo.world.metrics import score_scene


@pytest.fixture(scope="module")
def scenes(world):
    rng = np.random.default_rng(11)
    return [world.sample_scene(rng, "train", k) for k in (2, 3) for _ in range(20)]


def _margins(image, scene, embed):
    sim = assign_image(image, slot_regions(scene.positions, image.shape[0]), scene.references, embed)["sim"]
    return np.array([np.max(np.delete(sim[i], i)) - sim[i, i] for i in range(sim.shape[0])])


def test_every_subject_of_a_true_render_is_closest_to_its_own_reference(world, scenes):
    embed = subject_embedder()
    for s in scenes:
        assert (_margins(s.image, s, embed) < 0).all(), s.prompt


@pytest.mark.parametrize("attribute, block", [("class", "shape"), ("body", "colour"), ("pattern", "texture"),
                                              ("detail", "mark")])
def test_each_block_sees_its_planted_attribute(world, scenes, attribute, block):
    """Copying one attribute of subject 1 into subject 0 raises subject 0's margin (its similarity to subject 1's
    reference minus to its own) in the block that reads that attribute, and in the whole embedding."""
    for embed in (subject_embedder({block: 1.0}), subject_embedder()):
        before, after = [], []
        for s in scenes:
            leaked = plant_leak(world, s, 0, 1, [attribute])
            if np.array_equal(leaked.image, s.image):
                continue  # the two subjects share that attribute
            sim0 = assign_image(s.image, slot_regions(s.positions, 32), s.references, embed)["sim"]
            sim1 = assign_image(leaked.image, slot_regions(s.positions, 32), s.references, embed)["sim"]
            before.append(sim0[0, 1] - sim0[0, 0])
            after.append(sim1[0, 1] - sim1[0, 0])
        assert len(before) >= 10
        assert np.mean(after) > np.mean(before) + 0.03, (attribute, block)


def test_the_margin_rises_with_each_planted_attribute_and_the_colour_histogram_misses_shape(world, scenes):
    embed, colour = subject_embedder(), colour_embedder()
    levels, colour_class = [], []
    for j in range(5):
        per = []
        for s in scenes:
            leaked = plant_leak(world, s, 0, 1, ["class", "pattern", "detail", "body"][:j])
            per.append(_margins(leaked.image, s, embed)[0])
        levels.append(np.mean(per))
    assert all(b > a for a, b in zip(levels[:-1], levels[1:], strict=False)), levels
    for s in scenes:  # the class alone: invisible to a colour histogram (same pixels' colours, other silhouette)
        leaked = plant_leak(world, s, 0, 1, ["class"])
        if not np.array_equal(leaked.image, s.image):
            colour_class.append(_margins(leaked.image, s, colour)[0] - _margins(s.image, s, colour)[0])
    assert abs(np.mean(colour_class)) < 0.05


def test_plant_leak_changes_only_the_target_and_the_truth_metric_sees_it(world, scenes):
    s = next(x for x in scenes if len(x.identities) == 2 and x.identities[0].cls != x.identities[1].cls)
    leaked = plant_leak(world, s, 0, 1, ["class"])
    assert leaked.prompt == s.prompt and leaked.identities == s.identities
    changed = np.any(leaked.image != s.image, axis=-1)
    assert changed.any() and not (changed & s.masks[1] & ~leaked.masks[0]).any()
    assert score_scene(leaked.image, leaked, world)["subjects"][0]["leakage"]["class"] == 1.0
    assert score_scene(s.image, s, world)["subjects"][0]["leakage"]["class"] == 0.0
    with pytest.raises(ValueError, match="unknown leak attributes"):
        plant_leak(world, s, 0, 1, ["colour"])


def test_features_ignore_the_background_and_the_crop_position(world):
    ident = world.identities[world.train_ids[0]]
    img, _ = world.render_reference(ident, np.random.default_rng(1))
    feats = subject_features(img)
    # the same pixels moved inside a larger crop of another plain colour: same subject, same blocks
    canvas = np.zeros((24, 24, 3), dtype=np.uint8)
    canvas[:] = (120, 150, 100)
    mask = subject_mask(img)
    ys, xs = np.nonzero(mask)
    canvas[ys + 5, xs + 3] = img[ys, xs]
    moved = subject_features(canvas)
    for b in BLOCKS:
        assert np.allclose(feats[b], moved[b], atol=1e-9), b
    assert all(np.linalg.norm(v) == pytest.approx(1.0) for v in feats.values())


def test_empty_crop_and_unknown_blocks():
    flat = np.full((10, 10, 3), 128, dtype=np.uint8)
    assert not subject_embedder()([flat]).any()
    with pytest.raises(ValueError, match="unknown embedding blocks"):
        subject_embedder({"hue": 1.0})


def test_bbox_crop_of_a_strip_keeps_the_subject(world, scenes):
    s = scenes[0]
    for region, mask in zip(slot_regions(s.positions, 32), s.masks, strict=True):
        crop_mask = subject_mask(bbox_crop(s.image, region))
        assert crop_mask.sum() >= 0.8 * mask.sum()
