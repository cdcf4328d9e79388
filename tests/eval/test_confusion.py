"""The identity-confusion metric of `focusdpo eval` on the toy benchmark (issue 16 point 3)."""

from __future__ import annotations

import json

import numpy as np
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


def _entry(confusion, leakage, own, margin=None):
    n = len(confusion)
    units = {"keys": [[2, 0, 0, i] for i in range(n)], "confusion": confusion, "leakage": leakage,
             "own_sim": own, "matched_sim": [1.0] * n, "fidelity": [0.5] * n, "prompt": [0.5] * n}
    if margin is not None:
        units["margin"] = margin
    return {"units": units}


def test_agreement_known_values():
    metrics = {"a": _entry([0, 0, 0, 1], [0.0, 0.1, 0.0, 0.2], [0.9, 0.9, 0.9, 0.5], [-0.5, -0.4, -0.5, -0.3]),
               "b": _entry([0, 1, 1, 1], [0.1, 0.3, 0.2, 0.4], [0.9, 0.6, 0.6, 0.5], [-0.4, -0.2, -0.3, -0.1]),
               "c": _entry([1, 1, 1, 1], [0.5, 0.4, 0.5, 0.6], [0.4, 0.4, 0.4, 0.4], [0.1, 0.0, 0.1, 0.2]),
               "old": {"fidelity": {}}}  # an entry without units is skipped
    out = confusion_agreement(metrics)
    assert out["n_methods"] == 3 and out["methods"]["b"]["confusion"] == pytest.approx(0.75)
    assert out["methods"]["b"]["margin"] == pytest.approx(-0.25)
    assert out["over_methods"]["confusion"] == pytest.approx(1.0)
    assert out["over_methods"]["neg_own_sim"] == pytest.approx(1.0)
    assert out["over_methods"]["margin"] == pytest.approx(1.0)
    # the margins rank the 12 units' leakage exactly (ties aside): 0.0 0.0 0.1 0.1 0.2 0.2 0.3 0.4 0.4 0.5 0.5 0.6
    assert out["over_units"]["n"] == 12 and out["over_units"]["confusion"] > 0.7
    assert out["over_units"]["margin"] > 0.95
    assert out["over_scenes"]["n"] == 4
    assert "| b | 0.750 | -0.250 |" in confusion_markdown(out)


def test_agreement_of_entries_written_before_the_margin():
    """A metrics.json from before the margin existed still gives the rate's correlations (margin: n/a)."""
    metrics = {"a": _entry([0, 0, 1], [0.0, 0.1, 0.3], [0.9, 0.8, 0.5]),
               "b": _entry([1, 1, 1], [0.4, 0.5, 0.6], [0.4, 0.4, 0.3]),
               "c": _entry([0, 1, 1], [0.1, 0.3, 0.2], [0.8, 0.6, 0.6])}
    out = confusion_agreement(metrics)
    assert out["over_methods"]["margin"] is None and out["over_units"]["margin"] is None
    assert out["over_methods"]["confusion"] == pytest.approx(1.0)
    assert "over methods n/a / +1.00" in confusion_markdown(out)


# ------------------------------------------------------------------------- DreamBench / any generator's folder


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def _mean_colour(images):
    return np.stack([np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0) for im in images])


def _side_by_side(left, right, w=32, h=16):
    img = np.full((h, w, 3), 0, dtype=np.uint8)
    img[:, : w // 2] = left
    img[:, w // 2:] = right
    return img


def test_subject_regions_strips_and_boxes(tmp_path):
    from focusdpo.eval.dreambench import DreamBenchError, subject_regions

    path = tmp_path / "000_a+b_0.png"
    regions, source = subject_regions(path, 2, (32, 16))
    assert source == "strips" and regions[0, :, :16].all() and not regions[0, :, 16:].any()
    (tmp_path / "000_a+b_0.boxes.json").write_text(json.dumps({"boxes": [[20, 2, 30, 12], [0, 0, 10, 16]]}))
    regions, source = subject_regions(path, 2, (32, 16))
    assert source == "boxes" and regions[0].sum() == 100 and regions[0, 2, 20] and regions[1, 15, 9]
    with pytest.raises(DreamBenchError, match="2 boxes for a prompt of 3 subjects"):
        subject_regions(path, 3, (32, 16))
    (tmp_path / "000_a+b_0.boxes.json").write_text("[1, 2]")
    with pytest.raises(DreamBenchError, match="not a boxes file"):
        subject_regions(path, 2, (32, 16))


def test_confusion_of_a_generated_folder_planted(tmp_path):
    """Planted: references red and blue; an image drawing them in prompt order is not confused, the swapped one
    is, and the swapped one with a boxes sidecar saying where each subject is drawn is not."""
    from focusdpo.eval.dreambench import Generated, confusion_generated, summarize_confusion
    from focusdpo.eval.dreambench_data import Entry

    red, blue = (220, 30, 30), (30, 30, 220)
    refs = (_png(tmp_path / "red.png", np.full((8, 8, 3), red, np.uint8)),
            _png(tmp_path / "blue.png", np.full((8, 8, 3), blue, np.uint8)))
    pair = Entry(0, "a red thing and a blue thing", ("red_thing", "blue_thing"), refs)
    single = Entry(1, "a red thing", ("red_thing",), refs[:1])
    good = _png(tmp_path / "000_red_thing+blue_thing_0.png", _side_by_side(red, blue))
    bad = _png(tmp_path / "000_red_thing+blue_thing_1.png", _side_by_side(blue, red))
    boxed = _png(tmp_path / "000_red_thing+blue_thing_2.png", _side_by_side(blue, red))
    (tmp_path / "000_red_thing+blue_thing_2.boxes.json").write_text(json.dumps({"boxes": [[16, 0, 32, 16],
                                                                                         [0, 0, 16, 16]]}))
    alone = _png(tmp_path / "001_red_thing_0.png", np.full((16, 16, 3), red, np.uint8))
    gen = [Generated(good, pair, 0), Generated(bad, pair, 1), Generated(boxed, pair, 2), Generated(alone, single, 0)]
    rows = confusion_generated(gen, _mean_colour)
    assert [(r["sample"], r["regions"], r["confused"]) for r in rows] == [
        (0, "strips", 0.0), (1, "strips", 1.0), (2, "boxes", 0.0)]
    assert rows[0]["own_sim"] == pytest.approx(1.0) and rows[1]["own_sim"] < 0.9
    assert rows[1]["matched_sim"] == pytest.approx(1.0) and rows[1]["assigned"] == "1 0"
    # margin: the swapped strips are each exactly the other reference (1) and cos(red, blue) from their own
    cos = np.dot(red, blue) / (np.linalg.norm(red) * np.linalg.norm(blue))
    assert rows[1]["margin"] == pytest.approx(1 - cos) and rows[0]["margin"] == pytest.approx(cos - 1)
    summary = summarize_confusion(rows)
    assert summary["rate"] == pytest.approx(1 / 3) and summary["regions"] == {"boxes": 1, "detector": 0, "strips": 2,
                                                                    "strips, detector missed": 0}
    assert summary["margin"] == pytest.approx(np.mean([r["margin"] for r in rows]))


def test_confusion_runs_with_a_tiny_saved_dino(tmp_path):
    import torch
    from transformers import ViTConfig, ViTModel

    from focusdpo.eval.dreambench import Generated, Scorer, confusion_generated, dino_embed
    from focusdpo.eval.dreambench_data import Entry

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    dino = ViTModel.from_pretrained(tmp_path / "dino").eval()
    embed = dino_embed(Scorer(dino, None, None, torch.device("cpu")))
    refs = (_png(tmp_path / "r0.png", np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)),
            _png(tmp_path / "r1.png", np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)))
    img = np.concatenate([np.asarray(__import__("PIL").Image.open(r)) for r in refs], axis=1)
    path = _png(tmp_path / "000_a+b_0.png", img)
    rows = confusion_generated([Generated(path, Entry(0, "p", ("a", "b"), refs), 0)], embed)
    # each strip is exactly its reference: own similarity 1 (same pixels, same preprocessing), no confusion
    assert rows[0]["confused"] == 0.0 and rows[0]["own_sim"] == pytest.approx(1.0, abs=1e-5)


def test_subject_query_names():
    from focusdpo.eval.dreambench import subject_query

    assert [subject_query(s) for s in ("rc_car", "dog2", "red_cartoon", "cat")] == ["rc car", "dog", "red cartoon",
                                                                                   "cat"]


def test_detector_regions_planted(tmp_path):
    """Planted: the image draws blue left and red right while the prompt says red then blue. Strips read it as
    confused; a detector that finds each named subject where it is drawn gives the right regions (not confused);
    a detector that misses falls back to strips and says so."""
    from focusdpo.data.mask_models import SubjectNotFound
    from focusdpo.eval.dreambench import Generated, confusion_generated, summarize_confusion
    from focusdpo.eval.dreambench_data import Entry

    red, blue = (220, 30, 30), (30, 30, 220)
    refs = (_png(tmp_path / "red.png", np.full((8, 8, 3), red, np.uint8)),
            _png(tmp_path / "blue.png", np.full((8, 8, 3), blue, np.uint8)))
    pair = Entry(0, "a red thing and a blue thing", ("red_thing", "blue_thing2"), refs)
    swapped = _png(tmp_path / "000_red_thing+blue_thing2_0.png", _side_by_side(blue, red))
    asked: list[list[str]] = []

    def found(image, queries):
        asked.append(queries)
        where = {"red thing": [16, 0, 32, 16], "blue thing": [0, 0, 16, 16]}
        return np.array([where[q] for q in queries], dtype=float), np.ones(len(queries))

    def missed(image, queries):
        raise SubjectNotFound("no box")

    gen = [Generated(swapped, pair, 0)]
    strips = confusion_generated(gen, _mean_colour)[0]
    detected = confusion_generated(gen, _mean_colour, found)[0]
    fallback = confusion_generated(gen, _mean_colour, missed)[0]
    assert asked == [["red thing", "blue thing"]]
    assert (strips["regions"], strips["confused"]) == ("strips", 1.0)
    assert (detected["regions"], detected["confused"]) == ("detector", 0.0)
    assert detected["own_sim"] == pytest.approx(1.0)
    assert (fallback["regions"], fallback["confused"]) == ("strips, detector missed", 1.0)
    assert summarize_confusion([strips, detected, fallback])["regions"] == {
        "boxes": 0, "detector": 1, "strips": 1, "strips, detector missed": 1}


def test_confusion_detector_loads_a_tiny_saved_owlv2(tmp_path):
    """eval.confusion_detector: a tiny random OWLv2 saved with save_pretrained, loaded by load_detector, gives one
    box per query inside the image (min score 0: random weights score low)."""
    from focusdpo.data.mask_models import MaskModelsUnavailable, load_detector
    from focusdpo.eval.dreambench import subject_regions
    from tiny_detectors import write_tiny_owlv2

    write_tiny_owlv2(tmp_path / "owl")
    detector = load_detector(str(tmp_path / "owl"), "cpu", min_score=0.0)
    image = _side_by_side((220, 30, 30), (30, 30, 220), w=48, h=24)
    regions, source = subject_regions(tmp_path / "x.png", 2, (48, 24), image, detector.detect, ["cat", "dog"])
    assert source == "detector" and regions.shape == (2, 24, 48) and regions.any(axis=(1, 2)).all()
    with pytest.raises(MaskModelsUnavailable, match="eval.confusion_detector"):
        load_detector(str(tmp_path / "nothing-here"), "cpu")
