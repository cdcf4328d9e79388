"""Judges of on-policy candidates and the identity assignment (issue 16 point 2): known values, planted cases."""

from __future__ import annotations

import numpy as np
import pytest

from focusdpo.config import WorldConfig
from focusdpo.judges import (
    Candidate,
    ChangedJudge,
    JudgeError,
    MatchingJudge,
    ToyJudge,
    assign_image,
    bbox_crop,
    colour_embedder,
    confusion_scores,
    identity_assignment,
    make_judge,
)
from focusdpo.world import World

RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


def mean_colour(images):
    """A planted embedder: the mean RGB of the crop (so solid colours have exact, known similarities)."""
    return np.stack([np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0) for im in images])


def two_subjects(left, right, size=16):
    """A grey image with a ``left`` and a ``right`` square, and their regions [2, H, W]."""
    img = np.full((size, size, 3), 128, dtype=np.uint8)
    regions = np.zeros((2, size, size), dtype=bool)
    regions[0, 4:12, 1:7] = True
    regions[1, 4:12, 9:15] = True
    img[regions[0]] = left
    img[regions[1]] = right
    return img, regions


def solid(colour, size=8):
    return np.full((size, size, 3), colour, dtype=np.uint8)


def test_assignment_known_values():
    assigned, matched = identity_assignment(np.array([[0.1, 0.9], [0.8, 0.2]]))
    assert assigned.tolist() == [1, 0] and matched.tolist() == [0.9, 0.8]
    assigned, matched = identity_assignment(np.array([[0.9, 0.1], [0.8, 0.7]]))
    assert assigned.tolist() == [0, 1]  # greedy would give row 1 nothing better; the optimum keeps the diagonal
    # more regions than references: the worst region stays unmatched
    assigned, matched = identity_assignment(np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.6]]))
    assert assigned.tolist() == [0, 1, -1] and np.isnan(matched[2])
    # the global optimum, not the row-wise best: row 0 prefers column 0, but 0.8 + 0.9 > 0.95 + 0.1
    assigned, _ = identity_assignment(np.array([[0.95, 0.8], [0.9, 0.1]]))
    assert assigned.tolist() == [1, 0]


def test_bbox_crop_cuts_the_region():
    img, regions = two_subjects(RED, BLUE)
    crop = bbox_crop(img, regions[1])
    assert crop.shape == (8, 6, 3) and (crop == BLUE).all()


def test_matching_flags_a_swapped_pair_and_not_the_positive():
    positive, regions = two_subjects(RED, BLUE)
    swapped, _ = two_subjects(BLUE, RED)
    refs = [solid(RED), solid(BLUE)]
    judge = MatchingJudge(mean_colour, margin=0.05)
    v = judge.judge(Candidate(positive, swapped, regions, "p", refs), 0)
    assert v.keep and v.reason == "confusion" and v.details["assigned_neg"] == [1, 0]
    assert v.gap > 0
    same = judge.judge(Candidate(positive, positive.copy(), regions, "p", refs), 0)
    assert not same.keep and same.reason == "not_worse" and same.gap == 0.0
    assert same.details["assigned_pos"] == [0, 1]


def test_matching_flags_a_similarity_drop_by_the_margin():
    positive, regions = two_subjects(RED, BLUE)
    faded, _ = two_subjects((170, 80, 80), BLUE)  # still closest to red, but less so
    refs = [solid(RED), solid(BLUE)]
    sim = lambda img: assign_image(img, regions, refs, mean_colour)["own"][0]  # noqa: E731
    drop = sim(positive) - sim(faded)
    assert 0 < drop < 0.2
    cand = Candidate(positive, faded, regions, "p", refs)
    kept = MatchingJudge(mean_colour, margin=drop - 1e-9).judge(cand, 0)
    assert kept.keep and kept.reason == "similarity_drop" and kept.gap == pytest.approx(drop)
    assert MatchingJudge(mean_colour, margin=drop + 1e-6).judge(cand, 0).reason == "not_worse"


def test_matching_refuses_to_judge_a_confused_positive():
    positive, regions = two_subjects(BLUE, RED)  # the positive itself does not match the prompt's order
    v = MatchingJudge(mean_colour).judge(Candidate(positive, positive, regions, "p", [solid(RED), solid(BLUE)]), 0)
    assert not v.keep and v.reason == "positive_confused"


def test_confusion_scores_per_image():
    good, regions = two_subjects(RED, BLUE)
    bad, _ = two_subjects(BLUE, RED)
    refs = [solid(RED), solid(BLUE)]
    rows = confusion_scores([good, bad], [regions, regions], [refs, refs], mean_colour)
    assert [r["confused"] for r in rows] == [0.0, 1.0]
    assert rows[0]["own_sim"] == pytest.approx(1.0) and rows[0]["matched_sim"] == pytest.approx(1.0)
    assert rows[1]["matched_sim"] == pytest.approx(1.0) and rows[1]["own_sim"] < 0.9  # matched, but to the other


def test_changed_judge():
    positive, regions = two_subjects(RED, BLUE)
    neg = positive.copy()
    neg[regions[0]] = GREEN
    assert ChangedJudge().judge(Candidate(positive, neg, regions, "p", []), 0).keep
    v = ChangedJudge().judge(Candidate(positive, positive, regions, "p", []), 0)
    assert not v.keep and v.reason == "unchanged"


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(n_identities=60))


def _toy_candidate(world, seed=3):
    scene = world.sample_scene(np.random.default_rng(seed), split="train", n_subjects=2)
    source = {"builder": "toy", "identities": [i.id for i in scene.identities]}
    return scene, source


def test_toy_judge_flags_another_subject_drawn_in_the_region(world):
    for seed in range(20):  # a scene whose two subjects differ in class and body colour: the swap must show
        scene, source = _toy_candidate(world, seed)
        a, b = scene.identities
        if a.cls != b.cls and a.body != b.body:
            break
    swapped, _ = world.render_scene([b, b], scene.placements, scene.background)
    negative = np.where(scene.masks[0][..., None], swapped, scene.image)  # subject 0's pixels painted as b
    judge = ToyJudge(world)
    v = judge.judge(Candidate(scene.image, negative, scene.masks, scene.prompt, scene.references, source), 0)
    assert v.keep and v.reason in ("gained_leakage", "lost_fidelity") and v.gap > 0
    same = judge.judge(Candidate(scene.image, scene.image.copy(), scene.masks, scene.prompt, scene.references,
                                 source), 0)
    assert not same.keep and same.reason == "not_worse" and same.gap == 0.0


def test_toy_judge_needs_the_world_identities(world):
    scene, _ = _toy_candidate(world)
    with pytest.raises(JudgeError, match="refresh_judge=matching or changed"):
        ToyJudge(world).judge(Candidate(scene.image, scene.image, scene.masks, scene.prompt, scene.references,
                                        {"builder": "manifest"}), 0)


def test_colour_embedder_sees_a_swap_in_the_toy_world(world):
    """With the download-free colour embedder, a toy scene whose subjects are swapped is confused and the
    ground-truth render is not (scenes whose two subjects have different body colours)."""
    embed = colour_embedder()
    checked = 0
    for seed in range(40):
        scene = world.sample_scene(np.random.default_rng(seed), split="heldout", n_subjects=2)
        a, b = scene.identities
        if a.body == b.body:
            continue
        swapped, _ = world.render_scene([b, a], scene.placements, scene.background)
        rows = confusion_scores([scene.image, swapped], [scene.masks, scene.masks],
                                [scene.references, scene.references], embed)
        assert rows[0]["confused"] == 0.0 and rows[1]["confused"] == 1.0, seed
        checked += 1
    assert checked >= 10


def test_make_judge_names_what_is_allowed():
    with pytest.raises(JudgeError, match="allowed toy, matching, changed"):
        make_judge("oracle")
    with pytest.raises(JudgeError, match="needs an embedder"):
        make_judge("matching")
    assert make_judge("matching", embed=mean_colour, margin=0.1).margin == 0.1


def test_matching_with_the_dino_scorer_loaded_from_a_saved_tiny_vit(tmp_path):
    """The matching judge end to end with ``dino_embedder`` on a tiny random ViT saved with save_pretrained: the
    protocol's preprocessing runs, the positive against itself is never kept and its gap is exactly 0, and the
    similarities are the embedder's cosines."""
    import torch
    from transformers import ViTConfig, ViTModel

    from focusdpo.judges import dino_embedder, similarity

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    embed = dino_embedder(str(tmp_path / "dino"))
    positive, regions = two_subjects(RED, BLUE, size=32)
    refs = [solid(RED, 16), solid(BLUE, 16)]
    emb = embed([positive, refs[0]])
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = similarity([bbox_crop(positive, regions[0])], refs, embed)
    assert sim.shape == (1, 2) and np.all(np.abs(sim) <= 1 + 1e-9)
    v = MatchingJudge(embed).judge(Candidate(positive, positive.copy(), regions, "p", refs), 0)
    assert not v.keep and v.gap == 0.0


def test_dino_embedder_names_a_bad_path(tmp_path):
    from focusdpo.eval.dreambench import DreamBenchError
    from focusdpo.judges import dino_embedder

    with pytest.raises(DreamBenchError, match="matching judge"):
        dino_embedder(str(tmp_path / "missing"))


def test_confusion_margin_known_values():
    from focusdpo.judges import confusion_margin

    sim = np.array([[0.9, 0.5, 0.2], [0.1, 0.3, 0.8], [0.4, 0.4, 0.4]])
    assert confusion_margin(sim) == pytest.approx([-0.4, 0.5, 0.0])
    more_regions = confusion_margin(np.array([[0.9, 0.1], [0.2, 0.7], [0.5, 0.5]]))
    assert more_regions[:2] == pytest.approx([-0.8, -0.5]) and np.isnan(more_regions[2])
    assert np.isnan(confusion_margin(np.array([[1.0]]))).all()  # one subject: no other reference
