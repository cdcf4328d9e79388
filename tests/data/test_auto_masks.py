"""``--auto-masks`` for K subjects: GrabCut layouts and colour order, the detector + segmenter plumbing on tiny random
OWLv2 / SAM models saved with ``save_pretrained``, the backend choice and its fallback with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from focusdpo.config import ConfigError, load_config
from focusdpo.data.automask import AutoMasker, MaskFailure, make_masker, prompt_subjects
from focusdpo.data.manifest import BadRecord, load_entry, read_manifest
from focusdpo.data.mask_models import SubjectNotFound, cxcywh_to_pixels, load_mask_models, pick_boxes

pytest.importorskip("cv2")

RED, BLUE, GREY = (200, 40, 40), (40, 60, 200), (230, 230, 230)


def _disc_scene(h: int = 64, w: int = 128, colours=(RED, BLUE), centres=((32, 32), (32, 96)), r: int = 18):
    """Plain background with one disc per colour; returns the image and the true masks [K, H, W]."""
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), GREY, np.uint8)
    masks = []
    for c, (cy, cx) in zip(colours, centres, strict=True):
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        img[m] = c
        masks.append(m)
    return img, np.stack(masks)


def _ref(colour) -> tuple[np.ndarray, np.ndarray]:
    img, masks = _disc_scene(32, 32, (colour,), ((16, 16),), 10)
    return img, masks[0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_prompt_subjects_known_values():
    assert prompt_subjects("a dog and a backpack in the jungle", 2) == ["dog", "backpack"]
    assert prompt_subjects("a cat, a stuffed animal and a can on the beach", 3) == ["cat", "stuffed animal", "can"]
    assert prompt_subjects("a dog and a dog", 2) == ["dog", "dog"]
    assert prompt_subjects("a red dog", 1) == ["red dog"]
    assert prompt_subjects("a dog wearing a santa hat, next to it is a can", 2) is None  # not "a X and a Y"
    assert prompt_subjects("a dog and a can in the jungle", 3) is None


def test_grabcut_components_are_ordered_by_colour_whatever_the_reference_order():
    """Two separated discs in a 96 x 128 photo (not a 2:1 composition): the ``components`` layout; each reference
    gets its own disc (planted colours)."""
    masker = AutoMasker()
    img, truth = _disc_scene(96, 128, centres=((30, 30), (66, 96)))
    refs = [_ref(RED), _ref(BLUE)]
    for order in ([0, 1], [1, 0]):
        regions, origin, why = masker.target(img, [None, None], [refs[i][0] for i in order],
                                             [refs[i][1] for i in order])
        assert origin == "grabcut-components" and why is None and regions.shape == (2, 96, 128)
        for k, i in enumerate(order):
            assert _iou(regions[k], truth[i]) > 0.9
        assert not (regions[0] & regions[1]).any()


def test_grabcut_strips_for_a_side_by_side_composition():
    """Two subjects joined by a bar across the seam (the whole-image GrabCut finds one component): the ``strips``
    layout, each half masked as a one-subject photo (the bar reaches the strip's border: background there)."""
    from focusdpo.data.masks import grabcut_subjects

    img, truth = _disc_scene(80, 128, centres=((40, 32), (40, 96)))  # 1.6:1, not a 2-tile composition
    img[36:45, 40:89] = (220, 200, 40)
    masks, layout = grabcut_subjects(img, 2)
    assert layout == "strips" and masks.shape == (2, 80, 128)
    assert not masks[0][:, 64:].any() and not masks[1][:, :64].any()  # each mask stays in its strip
    assert _iou(masks[0], truth[0]) > 0.85 and _iou(masks[1], truth[1]) > 0.85


def test_a_k_to_1_image_is_masked_as_a_composition_of_k_tiles():
    """Two discs in a 64 x 128 image (2:1) and three in 64 x 192 (3:1): strips, even though the discs stand apart;
    in a 64 x 192 image two subjects are not a composition (3:1 for K = 2) and the components are used."""
    from focusdpo.data.masks import grabcut_subjects

    img, truth = _disc_scene()
    masks, layout = grabcut_subjects(img, 2)
    assert layout == "strips" and _iou(masks[0], truth[0]) > 0.85 and _iou(masks[1], truth[1]) > 0.85
    img3, truth3 = _disc_scene(64, 192, (RED, BLUE, (40, 160, 60)), ((32, 32), (32, 96), (32, 160)))
    masks3, layout3 = grabcut_subjects(img3, 3)
    assert layout3 == "strips" and all(_iou(masks3[i], truth3[i]) > 0.85 for i in range(3))
    img2, truth2 = _disc_scene(64, 192, centres=((32, 40), (32, 150)))
    assert grabcut_subjects(img2, 2)[1] == "components"


def test_target_boxes_give_masks_in_box_order_inside_the_boxes(tmp_path):
    img, truth = _disc_scene()
    Image.fromarray(img).save(tmp_path / "t.png")
    for i, c in enumerate((RED, BLUE)):
        Image.fromarray(_ref(c)[0]).save(tmp_path / f"r{i}.png")
    line = {"prompt": "two discs", "target": "t.png", "references": [{"image": "r1.png"}, {"image": "r0.png"}],
            "target_boxes": [[70, 8, 122, 56], [6, 8, 58, 56]]}  # reference 0 is blue: the right disc
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    (_, _, entry), = list(read_manifest(tmp_path / "m.jsonl"))
    got = load_entry(entry, tmp_path.resolve(), patch=8, max_pixels=10**6, auto_masks=True)
    assert got.provenance["mask_origin"]["target_masks"] == "grabcut-boxes"
    assert _iou(got.regions[0], truth[1]) > 0.9 and _iou(got.regions[1], truth[0]) > 0.9
    assert not got.regions[0][:, :70].any() and not got.regions[1][:, 58:].any()
    assert got.provenance["mask_origin"]["references"] == ["grabcut", "grabcut"]


@pytest.mark.parametrize("boxes, why", [([[0, 0, 10, 10]], "one [x0, y0, x1, y1]"),
                                        ([[0, 0, 10, 10], [5, 5, 5, 9]], "x0 < x1"),
                                        ([[0, 0, 10, 10], [0, 0, 10, -1]], "0 <= y0 < y1"),
                                        ("0,0,10,10", "one [x0, y0, x1, y1]")])
def test_bad_target_boxes_are_rejected(tmp_path, boxes, why):
    line = {"prompt": "p", "target": "t.png", "references": [{"image": "a.png"}, {"image": "b.png"}],
            "target_boxes": boxes}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    (_, _, entry), = list(read_manifest(tmp_path / "m.jsonl"))
    assert isinstance(entry, BadRecord) and "'target_boxes'" in str(entry) and why in str(entry)


def test_reference_keys_are_checked(tmp_path):
    lines = [{"prompt": "p", "target": "t.png", "references": [{"image": "a.png", "clas": "dog"}]},
             {"prompt": "p", "target": "t.png", "references": [{"image": "a.png", "class": ""}]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (_, _, a), (_, _, b) = list(read_manifest(tmp_path / "m.jsonl"))
    assert "references[0] has unknown key(s) ['clas']" in str(a) and "allowed: image, mask, class" in str(a)
    assert "references[0].class must be a non-empty string" in str(b)


def test_colour_order_respects_allowed():
    from focusdpo.data.masks import colour_order

    img, truth = _disc_scene()
    refs = [_ref(BLUE), _ref(RED)]
    imgs, rmasks = [r[0] for r in refs], [r[1] for r in refs]
    assert colour_order(img, truth, imgs, rmasks) == [1, 0]
    assert colour_order(img, truth, imgs, rmasks, allowed=np.eye(2, dtype=bool)) == [0, 1]  # forced


def test_owl_box_conversion_known_values():
    boxes = np.array([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])
    # OWL-ViT: relative to the 100 x 200 image itself
    assert np.allclose(cxcywh_to_pixels(boxes, 100, 200, padded=False), [[50, 25, 150, 75], [0, 0, 100, 50]])
    # OWLv2: relative to the 200 x 200 square the image was padded to (bottom/right); clipped to the image
    assert np.allclose(cxcywh_to_pixels(boxes, 100, 200, padded=True), [[50, 50, 150, 100], [0, 0, 100, 100]])


def test_pick_boxes_one_distinct_box_per_query():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]], float)
    scores = np.array([[0.9, 0.8], [0.85, 0.7], [0.3, 0.6], [0.05, 0.2]])  # [P, K]
    logits = np.log(scores / (1 - scores))
    got, s = pick_boxes(boxes, logits, ["dog", "dog"], 0.1, 0.5)
    # query 0 takes box 0; box 1 overlaps it (IoU 0.81), so query 1 takes box 2, not its best box 0
    assert np.array_equal(got, boxes[[0, 2]]) and np.allclose(s, [0.9, 0.6])
    with pytest.raises(SubjectNotFound, match=r"'dog': 0.6.*data.mask_min_score=0.7"):
        pick_boxes(boxes, logits, ["cat", "dog"], 0.7, 0.5)


# --- tiny random OWLv2 + SAM, saved and loaded like a user's models ------------------------------------------------


def _tiny_models(folder: Path) -> tuple[Path, Path]:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    from tiny_detectors import write_tiny_owlv2

    det = write_tiny_owlv2(folder / "owlv2")
    sam = SamModel(SamConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, output_channels=16, num_pos_feats=8, window_size=2,
                           global_attn_indexes=[1], mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16)))
    seg = folder / "sam"
    sam.save_pretrained(seg)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                                   mask_size={"longest_edge": 16},
                                                   mask_pad_size={"height": 16, "width": 16})).save_pretrained(seg)
    return det, seg


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    return _tiny_models(tmp_path_factory.mktemp("mask_models"))


def test_tiny_detector_and_segmenter_plumbing(tiny_models):
    """Boxes are the detector's best distinct boxes per query, in query order; one mask per box, inside it."""
    import torch

    det, seg = tiny_models
    models = load_mask_models(str(det), str(seg), min_score=0.0)
    img, _ = _disc_scene(48, 80)
    masks, boxes, scores = models.masks(img, ["dog", "backpack"])
    assert masks.shape == (2, 48, 80) and masks.dtype == bool and boxes.shape == (2, 4) and scores.shape == (2,)
    for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        ys, xs = np.nonzero(m)
        assert len(ys) > 0 and xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1)
        assert ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
    # the same boxes from the raw detector output (sigmoid scores, OWLv2's padded square frame)
    inputs = models.det_processor(text=[["dog", "backpack"]], images=[Image.fromarray(img)], return_tensors="pt")
    with torch.no_grad():
        out = models.detector(**inputs)
    raw = cxcywh_to_pixels(out.pred_boxes[0].numpy(), 48, 80, padded=True)
    want, _ = pick_boxes(raw, out.logits[0].double().numpy(), ["dog", "backpack"], 0.0, 0.5)
    assert np.allclose(boxes, want)
    # query order is subject order: swapping the queries swaps the boxes and the masks
    masks2, boxes2, _ = models.masks(img, ["backpack", "dog"])
    assert np.allclose(boxes2, boxes[::-1]) and np.array_equal(masks2, masks[::-1])


def test_manifest_record_through_the_models(tiny_models, tmp_path):
    """A 2-subject record without masks: references and target masked by the models (classes from the prompt and
    from a reference's 'class'); reversing the references reverses the regions."""
    det, seg = tiny_models
    cfg = load_config(None, [f"data.mask_detector={det}", f"data.mask_segmenter={seg}", "data.mask_backend=models",
                             "data.mask_min_score=0.0"])
    logs: list[str] = []
    masker = make_masker(cfg.data, logs.append)
    assert masker.backend == "models" and masker.strict and str(det) in logs[0]
    img, _ = _disc_scene(64, 128)
    Image.fromarray(img).save(tmp_path / "t.png")
    for i, c in enumerate((RED, BLUE)):
        Image.fromarray(_disc_scene(64, 64, (c,), ((32, 32),), 20)[0]).save(tmp_path / f"r{i}.png")
    lines = [{"id": "ab", "prompt": "a dog and a backpack on the beach", "target": "t.png",
              "references": [{"image": "r0.png"}, {"image": "r1.png"}]},
             {"id": "ba", "prompt": "a backpack and a dog on the beach", "target": "t.png",
              "references": [{"image": "r1.png", "class": "backpack"}, {"image": "r0.png", "class": "dog"}]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = [load_entry(e, tmp_path.resolve(), patch=8, max_pixels=10**6, auto_masks=masker)
           for _, _, e in read_manifest(tmp_path / "m.jsonl")]
    assert got[0].provenance["mask_origin"] == {"target_masks": "models", "references": ["models", "models"]}
    assert got[0].regions.shape == (2, 64, 128) and got[0].regions.any(axis=(1, 2)).all()
    assert np.array_equal(got[1].regions, got[0].regions[::-1])
    assert np.array_equal(got[1].ref_masks[0], got[0].ref_masks[1])


def test_models_failure_per_record_falls_back_or_rejects(tiny_models, tmp_path):
    """A subject the detector does not find (score threshold 1.0): auto -> GrabCut with the reason; models -> the
    record's failure."""
    det, seg = tiny_models
    img, truth = _disc_scene()
    refs = [_ref(RED), _ref(BLUE)]
    over = [f"data.mask_detector={det}", f"data.mask_segmenter={seg}", "data.mask_min_score=1.0"]
    auto = make_masker(load_config(None, over + ["data.mask_backend=auto"]).data, lambda m: None)
    regions, origin, why = auto.target(img, ["dog", "cat"], [r[0] for r in refs], [r[1] for r in refs])
    assert origin == "grabcut-strips" and "found no box" in why and _iou(regions[0], truth[0]) > 0.85
    strict = make_masker(load_config(None, over + ["data.mask_backend=models"]).data, lambda m: None)
    with pytest.raises(MaskFailure, match="models: the detector found no box"):
        strict.target(img, ["dog", "cat"], [r[0] for r in refs], [r[1] for r in refs])


def test_unavailable_models_fall_back_with_the_reason(tmp_path, tiny_models):
    """No network: a hub id that is not cached, a missing folder, a folder of the wrong kind."""
    det, seg = tiny_models
    cases = [("nobody/not-a-cached-model", str(seg), "neither a local folder nor in the Hugging Face cache"),
             (str(tmp_path / "missing"), str(seg), "neither a local folder"),
             (str(seg), str(seg), "is a 'sam' model; allowed: owlvit, owlv2")]
    for detector, segmenter, reason in cases:
        cfg = load_config(None, [f"data.mask_detector={detector}", f"data.mask_segmenter={segmenter}"])
        logs: list[str] = []
        masker = make_masker(cfg.data, logs.append)
        assert masker.backend == "grabcut" and masker.models is None
        assert logs[0].startswith("auto masks: GrabCut (the detector/segmenter are unavailable") and reason in logs[0]
        assert reason in masker.info["reason"]
        cfg.data.mask_backend = "models"
        with pytest.raises(ValueError, match="data.mask_backend=models: .*falls back"):
            make_masker(cfg.data, logs.append)


def test_mask_config_fields_are_checked():
    with pytest.raises(ConfigError, match="data.mask_backend='sam' is invalid: allowed one of auto, models, grabcut"):
        load_config(None, ["data.mask_backend=sam"])
    with pytest.raises(ConfigError, match=r"data.mask_min_score=1.5 is invalid: allowed a number in \[0, 1\]"):
        load_config(None, ["data.mask_min_score=1.5"])


def test_cli_build_falls_back_with_the_reason_and_builds_two_subject_pairs(tmp_path):
    """``dip build --auto-masks`` with the default backend (auto) and no cached models: the GrabCut line, no
    traceback, and a 2-subject record built into an attribute_swap pair whose M_prior is one subject's disc."""
    from focusdpo.cli import app
    from focusdpo.data.dataset import DipDataset

    img, truth = _disc_scene()
    Image.fromarray(img).save(tmp_path / "t.png")
    for i, c in enumerate((RED, BLUE)):
        Image.fromarray(_ref(c)[0]).save(tmp_path / f"r{i}.png")
    line = {"prompt": "a red disc and a blue disc", "target": "t.png",
            "references": [{"image": "r0.png"}, {"image": "r1.png"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    res = CliRunner().invoke(app, ["dip", "build", "--manifest", str(tmp_path / "m.jsonl"), "--auto-masks",
                                   "--patch", "8", "--out", str(tmp_path / "dip"),
                                   "data.mask_detector=nobody/not-cached", "data.disruptions={attribute_swap: 1}"])
    assert res.exit_code == 0, res.output
    assert "auto masks: GrabCut (the detector/segmenter are unavailable: data.mask_detector='nobody/not-cached'" \
        in res.output and "Traceback" not in res.output
    rec = DipDataset(tmp_path / "dip").record(0)
    assert rec.disruption == "attribute_swap" and rec.num_subjects == 2
    k = rec.disrupted[0]
    assert _iou(rec.m_prior, truth[k]) > 0.9 and np.array_equal(rec.negative[~rec.m_prior], img[~rec.m_prior])
    card = json.loads((tmp_path / "dip" / "card.json").read_text())
    assert card["auto_masks"]["backend"] == "grabcut" and "not-cached" in card["auto_masks"]["reason"]


def test_target_boxes_outside_the_target_reject_the_record(tmp_path):
    img, _ = _disc_scene()
    Image.fromarray(img).save(tmp_path / "t.png")
    line = {"prompt": "p", "target": "t.png", "references": [{"image": "t.png"}, {"image": "t.png"}],
            "target_boxes": [[0, 0, 64, 64], [64, 0, 129, 64]]}  # the target is 128 wide
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    (_, _, entry), = list(read_manifest(tmp_path / "m.jsonl"))
    with pytest.raises(BadRecord, match=r"target_boxes .* reach outside the 128x64 target"):
        load_entry(entry, tmp_path.resolve(), patch=8, max_pixels=10**6, auto_masks=True)


def test_manifest_schema_is_documented_in_the_help_and_the_readme():
    """Every manifest key the parser accepts is named in ``dip build --help`` and in the README's table."""
    from focusdpo.cli import app
    from focusdpo.data.manifest import KEYS, REF_KEYS

    res = CliRunner().invoke(app, ["dip", "build", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key in [*(k for k in KEYS if k != "references"), *(f"references[].{k}" for k in REF_KEYS)]:
        assert key in res.output, key
        assert f"| `{key}` |" in readme, key
    for field in ("data.mask_backend", "data.mask_detector", "data.mask_segmenter", "data.mask_min_score"):
        assert field in readme
