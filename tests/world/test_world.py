"""The synthetic world: identities, split, references, scenes, prompts, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from focusdpo.config import ConfigError, WorldConfig
from focusdpo.world import Identity, Placement, Scene, World
from focusdpo.world.prompts import parse_prompt
from focusdpo.world.render import background_image
from focusdpo.world.subjects import (
    BACKGROUNDS,
    CLASSES,
    COLOUR_FAMILIES,
    COLOURS,
    DETAILS,
    MARK_COLOURS,
    PATTERNS,
    colour_family,
    mark_colour,
)


def _scenes(world: World, n: int, seed: int = 0, split: str = "train", k: int = 2) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, split, k) for _ in range(n)]


def test_attribute_counts_meet_the_spec():
    assert len(CLASSES) >= 6 and len(COLOURS) >= 8 and len(PATTERNS) >= 5 and len(DETAILS) >= 3
    assert len(BACKGROUNDS) >= 3
    assert sorted(c for members in COLOUR_FAMILIES.values() for c in members) == sorted(COLOURS)


def test_palette_colours_are_distinguishable():
    """Subject colours stay far from each other, from every background and from the mark colours."""
    subject = np.array(list(COLOURS.values()), dtype=float)
    others = np.array([*BACKGROUNDS.values(), *MARK_COLOURS.values()], dtype=float)
    pair = np.linalg.norm(subject[:, None] - subject[None], axis=-1) + np.eye(len(subject)) * 1e3
    assert pair.min() >= 80
    assert np.linalg.norm(subject[:, None] - others[None], axis=-1).min() >= 80


def test_identities_are_distinct_tuples(world: World):
    assert len(world.identities) == 600 >= 500
    tuples = {(i.cls, i.body, i.pattern, i.pattern_colour, i.detail) for i in world.identities}
    assert len(tuples) == len(world.identities)
    assert [i.id for i in world.identities] == list(range(600))
    assert all(i.pattern_colour != i.body for i in world.identities)


def test_split_is_disjoint_and_holds_unseen_combinations(world: World):
    train, held = set(world.train_ids), set(world.heldout_ids)
    assert not train & held and train | held == set(range(600))
    assert len(held) == 120
    train_triples = {(world.identities[i].cls, world.identities[i].body, world.identities[i].pattern)
                     for i in train}
    held_triples = [(world.identities[i].cls, world.identities[i].body, world.identities[i].pattern) for i in held]
    unseen = sum(t not in train_triples for t in held_triples)
    assert 40 <= unseen <= 80  # about half the held-out set: combinations never seen in training
    assert len(held) - unseen >= 40  # the rest: unseen full tuples of seen triples
    for attr, values in (("cls", CLASSES), ("body", COLOURS), ("pattern", PATTERNS), ("detail", DETAILS)):
        assert {getattr(world.identities[i], attr) for i in train} == set(values)


@pytest.mark.parametrize("n", [20, 57, 200])
def test_small_worlds_get_the_requested_split(n: int):
    world = World(WorldConfig(n_identities=n, heldout_fraction=0.25))
    assert len(world.heldout_ids) == round(0.25 * n)
    assert not set(world.train_ids) & set(world.heldout_ids)
    assert len(world.train_ids) + len(world.heldout_ids) == n


def test_references_are_deterministic_and_jittered(world: World):
    ident = world.identities[3]
    a, ma = world.render_reference(ident, np.random.default_rng(1))
    b, mb = world.render_reference(ident, np.random.default_rng(1))
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    masks = [world.render_reference(ident, np.random.default_rng(s))[1] for s in range(2, 8)]
    assert len({m.tobytes() for m in masks}) == len(masks)  # pose and scale differ between draws


def test_world_is_deterministic_from_its_seed(world: World):
    again = World(WorldConfig())
    assert again.identities == world.identities and again.heldout_ids == world.heldout_ids
    other = World(WorldConfig(seed=1))
    assert other.identities != world.identities
    a, b = _scenes(world, 3, seed=5), _scenes(again, 3, seed=5)
    for x, y in zip(a, b, strict=True):
        assert x.prompt == y.prompt and np.array_equal(x.image, y.image) and np.array_equal(x.masks, y.masks)
        assert all(np.array_equal(r, s) for r, s in zip(x.references, y.references, strict=True))
    assert not np.array_equal(_scenes(world, 1, seed=6)[0].image, a[0].image)


def test_scene_ground_truth_is_consistent(world: World):
    for k in (1, 2, 3):
        for scene in _scenes(world, 20, seed=k, k=k):
            s = world.cfg.scene_size
            assert scene.image.shape == (s, s, 3) and scene.image.dtype == np.uint8
            assert scene.masks.shape == (k, s, s) and scene.masks.dtype == bool
            assert scene.masks.sum(0).max() <= 1  # disjoint
            assert (scene.masks.sum((1, 2)) > 0).all()
            bg = background_image(scene.background, s, world.cfg.seed)
            outside = ~scene.masks.any(0)
            assert np.array_equal(scene.image[outside], bg[outside])
            for ident, mask in zip(scene.identities, scene.masks, strict=True):
                allowed = {COLOURS[ident.body], COLOURS[ident.pattern_colour], MARK_COLOURS[mark_colour(ident.body)]}
                assert {tuple(p) for p in scene.image[mask]} <= allowed
            nouns, positions, background = parse_prompt(scene.prompt)
            assert nouns == [i.noun for i in scene.identities] and positions == scene.positions
            assert background == scene.background
            assert len(scene.references) == len(scene.ref_masks) == k


def test_positions_match_mask_centroids(world: World):
    order = {"left": 0, "middle": 1, "right": 2}
    for k in (2, 3):
        for scene in _scenes(world, 20, seed=10 + k, k=k):
            xs = [np.nonzero(m)[1].mean() for m in scene.masks]
            by_x = [scene.positions[i] for i in np.argsort(xs)]
            assert by_x == sorted(scene.positions, key=order.get)


def test_reference_order_is_shuffled_against_positions_and_subjects_share_and_touch(world: World):
    scenes = _scenes(world, 200, seed=3)
    first_left = sum(s.positions[0] == "left" for s in scenes)
    assert 60 <= first_left <= 140  # the first reference is not always the left subject
    a_b = [(s.identities[0], s.identities[1]) for s in scenes]
    same_class = sum(a.cls == b.cls for a, b in a_b)
    same_family = sum(colour_family(a.body) == colour_family(b.body) for a, b in a_b)
    # share_prob 0.3 lifts both well above chance (1/6 of classes, about 1/4 of colour families)
    assert same_class >= 40 and same_family >= 60
    touching = 0
    for s in scenes:
        grown = s.masks[0] | np.roll(s.masks[0], 1, 1) | np.roll(s.masks[0], -1, 1)
        touching += bool((grown & s.masks[1]).any())
    assert touching >= 5


def test_heldout_scenes_draw_only_heldout_identities(world: World):
    held = set(world.heldout_ids)
    for scene in _scenes(world, 20, seed=4, split="heldout", k=3):
        assert {i.id for i in scene.identities} <= held
        assert len({i.id for i in scene.identities}) == 3


def test_render_scene_rerenders_and_swaps_one_slot(world: World):
    scene = _scenes(world, 1, seed=7)[0]
    image, masks = world.render_scene(scene.identities, scene.placements, scene.background)
    assert np.array_equal(image, scene.image) and np.array_equal(masks, scene.masks)
    other = next(i for i in world.identities if i.cls == scene.identities[0].cls and i != scene.identities[0])
    swapped, new_masks = world.render_scene([other, scene.identities[1]], scene.placements, scene.background)
    changed = (swapped != scene.image).any(-1)
    assert changed.any()
    assert not (changed & ~(scene.masks[0] | new_masks[0])).any()
    assert np.array_equal(new_masks[0], scene.masks[0])  # same class, same placement: same silhouette


def test_reference_is_the_subject_alone_inside_the_frame(world: World):
    rng = np.random.default_rng(0)
    for ident in world.identities[:50]:
        image, mask = world.render_reference(ident, rng)
        r = world.cfg.ref_size
        assert image.shape == (r, r, 3) and mask.shape == (r, r) and mask.dtype == bool
        assert (image[~mask] == world.palette["reference"]).all()
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        body = (image[mask] == COLOURS[ident.body]).all(-1).sum()
        pattern = (image[mask] == COLOURS[ident.pattern_colour]).all(-1).sum()
        marks = (image[mask] == MARK_COLOURS[mark_colour(ident.body)]).all(-1).sum()
        assert body > pattern > 0 and 1 <= marks <= 6  # body dominant, pattern visible, a small (rotated) mark


def test_every_attribute_is_visible_in_two_subject_scenes(world: World):
    for scene in _scenes(world, 30, seed=8):
        for ident, mask, place in zip(scene.identities, scene.masks, scene.placements, strict=True):
            assert 11 <= place.size * 32 <= 15
            px = scene.image[mask]
            body = (px == COLOURS[ident.body]).all(-1).sum()
            pattern = (px == COLOURS[ident.pattern_colour]).all(-1).sum()
            assert body > pattern > 0


def test_larger_resolution_works():
    world = World(WorldConfig(scene_size=64, ref_size=32))
    scene = world.sample_scene(np.random.default_rng(0), "heldout", 3)
    assert scene.image.shape == (64, 64, 3) and scene.masks.shape == (3, 64, 64)
    assert scene.references[0].shape == (32, 32, 3)
    small = World(WorldConfig())
    big_area = scene.masks.sum() / 64**2
    small_area = small.sample_scene(np.random.default_rng(0), "heldout", 3).masks.sum() / 32**2
    assert abs(big_area - small_area) < 0.05  # the same layout scales with the resolution


def test_vocabulary_covers_every_prompt(world: World):
    vocab = set(world.vocabulary())
    for k in (1, 2, 3):
        for scene in _scenes(world, 10, seed=20 + k, k=k):
            assert set(scene.prompt.split()) <= vocab
    assert set(CLASSES) <= vocab and set(BACKGROUNDS) <= vocab


def test_bad_arguments_are_named(world: World):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="split"):
        world.sample_scene(rng, "test")
    with pytest.raises(ValueError, match="n_subjects"):
        world.sample_scene(rng, "train", 4)
    with pytest.raises(ValueError, match="placements"):
        world.render_scene([world.identities[0]], [], "sand")
    with pytest.raises(ValueError, match="background"):
        world.render_scene([world.identities[0]], [Placement(0.5, 0.5, 0.4)], "lava")
    with pytest.raises(ConfigError, match="share_prob"):
        WorldConfig(share_prob=1.5)
    assert isinstance(world.identities[0], Identity)
