"""Manifest import: parsing, path containment, every bad-input case names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dip_fixtures import make_scene
from PIL import Image

from focusdpo.data.manifest import BadRecord, load_entry, read_manifest


def write_good_set(root: Path, n: int = 3, k: int = 2) -> list[dict]:
    """n records with K subjects: target, target masks, references (first one with a mask)."""
    lines = []
    for i in range(n):
        img, regions = make_scene(i, k, size=36)  # 36 is not a multiple of 8: exercises the crop
        Image.fromarray(img).save(root / f"t{i}.png")
        for j in range(k):
            Image.fromarray(regions[j].astype(np.uint8) * 255).save(root / f"t{i}_m{j}.png")
            Image.fromarray(img[:16, :16]).save(root / f"t{i}_r{j}.png")
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / f"t{i}_rm0.png")
        refs = [{"image": f"t{i}_r{j}.png"} for j in range(k)]
        refs[0]["mask"] = f"t{i}_rm0.png"
        lines.append({"prompt": f"scene {i}", "target": f"t{i}.png",
                      "target_masks": [f"t{i}_m{j}.png" for j in range(k)], "references": refs, "id": f"s{i}"})
    return lines


def dump(root: Path, lines: list) -> Path:
    path = root / "manifest.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_good_manifest_loads(tmp_path):
    path = dump(tmp_path, write_good_set(tmp_path))
    rows = list(read_manifest(path))
    assert [e.id for _, _, e in rows] == ["s0", "s1", "s2"]
    loaded = load_entry(rows[0][2], tmp_path.resolve(), patch=8, max_pixels=10**6, auto_masks=False)
    img, regions = make_scene(0, 2, size=36)
    assert loaded.image.shape == (32, 32, 3) and loaded.provenance["crop"] == [2, 2, 32, 32]
    assert np.array_equal(loaded.image, img[2:34, 2:34]) and np.array_equal(loaded.regions, regions[:, 2:34, 2:34])
    assert loaded.provenance["mask_origin"]["references"] == ["file", "unknown"]
    assert loaded.ref_masks[1].all() and loaded.provenance["target"] == "t0.png"


def _reason(tmp_path: Path, mutate, auto_masks: bool = False) -> str:
    lines = write_good_set(tmp_path, n=1)
    mutate(tmp_path, lines[0])
    (_, _, entry), = list(read_manifest(dump(tmp_path, lines)))
    with pytest.raises(BadRecord) as err:
        if isinstance(entry, BadRecord):
            raise entry
        load_entry(entry, tmp_path.resolve(), patch=8, max_pixels=40 * 40, auto_masks=auto_masks)
    return str(err.value)


def test_unreadable_image(tmp_path):
    def m(root, rec):
        (root / "t0.png").write_bytes(b"not an image at all")
    assert "cannot be read" in _reason(tmp_path, m)


def test_truncated_image(tmp_path):
    def m(root, rec):
        data = (root / "t0.png").read_bytes()
        (root / "t0.png").write_bytes(data[: len(data) // 2])
    assert "cannot be read" in _reason(tmp_path, m)


def test_mask_of_another_size(tmp_path):
    def m(root, rec):
        Image.fromarray(np.full((20, 20), 255, np.uint8)).save(root / "t0_m1.png")
    r = _reason(tmp_path, m)
    assert "target_masks[1]" in r and "20x20" in r and "36x36" in r


def test_empty_mask(tmp_path):
    def m(root, rec):
        Image.fromarray(np.zeros((36, 36), np.uint8)).save(root / "t0_m0.png")
    assert "target_masks[0]" in (r := _reason(tmp_path, m)) and "empty" in r


def test_missing_reference(tmp_path):
    def m(root, rec):
        (root / "t0_r1.png").unlink()
    assert "references[1].image" in (r := _reason(tmp_path, m)) and "missing" in r


def test_path_leaving_root(tmp_path):
    sub = tmp_path / "set"
    sub.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside.png")

    def m(root, rec):
        rec["references"][0]["image"] = "../outside.png"
    lines = write_good_set(sub, n=1)
    m(sub, lines[0])
    (_, _, entry), = list(read_manifest(dump(sub, lines)))
    assert isinstance(entry, BadRecord) and "leaves the manifest's root" in str(entry)


def test_symlink_leaving_root(tmp_path):
    sub = tmp_path / "set"
    sub.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside.png")
    lines = write_good_set(sub, n=1)
    (sub / "link.png").symlink_to(tmp_path / "outside.png")
    lines[0]["target"] = "link.png"
    (_, _, entry), = list(read_manifest(dump(sub, lines)))
    assert isinstance(entry, BadRecord) and "leaves" in str(entry)


def test_image_over_pixel_limit(tmp_path):
    def m(root, rec):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "t0_r0.png")
    r = _reason(tmp_path, m)
    assert "references[0].image" in r and "over the limit 1600" in r


def test_structural_problems(tmp_path):
    lines = write_good_set(tmp_path, n=4)
    lines[1]["target_masks"] = lines[1]["target_masks"][:1]
    del lines[2]["prompt"]
    lines[3]["id"] = "s0"
    rows = list(read_manifest(dump(tmp_path, lines + ["{not json", "[1, 2]"])))
    reasons = [str(e) if isinstance(e, BadRecord) else None for _, _, e in rows]
    assert reasons[0] is None
    assert "one mask per reference (2)" in reasons[1]
    assert "'prompt'" in reasons[2]
    assert "used by an earlier line" in reasons[3]
    assert "not valid JSON" in reasons[4] and "JSON object" in reasons[5]


def test_missing_target_masks_needs_auto_masks(tmp_path):
    def m(root, rec):
        del rec["target_masks"]
    assert "--auto-masks" in _reason(tmp_path, m)


def test_auto_masks_for_one_subject(tmp_path):
    pytest.importorskip("cv2")
    size = 48
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 230, np.uint8)
    disc = (yy - 24) ** 2 + (xx - 24) ** 2 <= 12 ** 2
    img[disc] = (200, 30, 30)
    Image.fromarray(img).save(tmp_path / "t.png")
    path = dump(tmp_path, [{"prompt": "a red disc", "target": "t.png", "references": [{"image": "t.png"}]}])
    (_, _, entry), = list(read_manifest(path))
    loaded = load_entry(entry, tmp_path.resolve(), patch=8, max_pixels=10**6, auto_masks=True)
    iou = (loaded.regions[0] & disc).sum() / (loaded.regions[0] | disc).sum()
    assert iou > 0.9 and loaded.provenance["mask_origin"]["target_masks"] == "grabcut"
    assert (loaded.ref_masks[0] == loaded.regions[0]).mean() > 0.98


def test_explicit_root(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    lines = write_good_set(data, n=1)
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    path = dump(elsewhere, lines)
    (_, _, entry), = list(read_manifest(path))
    with pytest.raises(BadRecord, match="missing"):
        load_entry(entry, elsewhere.resolve(), patch=4, max_pixels=10**6, auto_masks=False)
    (_, _, entry), = list(read_manifest(path, root=data))
    assert not isinstance(entry, BadRecord) and entry.target == (data / "t0.png").resolve()
    loaded = load_entry(entry, data.resolve(), patch=4, max_pixels=10**6, auto_masks=False)
    assert loaded.image.shape == (36, 36, 3)


def test_grabcut_fills_holes_and_keeps_one_component():
    cv2 = pytest.importorskip("cv2")  # noqa: F841
    from focusdpo.data.masks import grabcut_mask

    size = 64
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 235, np.uint8)
    body = (yy - 32) ** 2 + (xx - 32) ** 2 <= 16 ** 2
    img[body] = (40, 90, 200)
    eye = (yy - 28) ** 2 + (xx - 28) ** 2 <= 2 ** 2
    img[eye] = (235, 235, 235)  # a background-coloured hole inside the subject
    img[2:6, 2:6] = (40, 90, 200)  # a speck of subject colour outside, in the margin
    mask = grabcut_mask(img, max_side=None)
    assert mask[eye].all() and not mask[2:6, 2:6].any()
    assert (mask & body).sum() / (mask | body).sum() > 0.95
    small = grabcut_mask(img, max_side=32)
    assert small.shape == (size, size) and (small & body).sum() / (small | body).sum() > 0.85


def test_auto_mask_failure_is_a_rejection(tmp_path):
    pytest.importorskip("cv2")
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(tmp_path / "flat.png")  # nothing to segment
    path = dump(tmp_path, [{"prompt": "nothing", "target": "flat.png", "references": [{"image": "flat.png"}]}])
    (_, _, entry), = list(read_manifest(path))
    with pytest.raises(BadRecord, match="GrabCut found a foreground"):
        load_entry(entry, tmp_path.resolve(), patch=8, max_pixels=10**6, auto_masks=True)


def test_square_resize_keeps_masks_hard_and_centred():
    from focusdpo.data.manifest import square_resize

    img = np.full((40, 80, 3), 200, np.uint8)
    masks = np.zeros((2, 40, 80), bool)
    masks[0, 10:30, 30:50] = True
    masks[1, :, :10] = True  # falls outside the centre crop
    out, m = square_resize(img, masks, 20)
    assert out.shape == (20, 20, 3) and m.shape == (2, 20, 20) and m.dtype == bool
    assert m[0, 5:15, 5:15].all() and m[0].sum() == 100 and not m[1].any()
    assert (out == 200).all()


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif, quality=100)
    from focusdpo.data.manifest import load_image

    out = load_image(tmp_path / "r.jpg", "target", 10**6)
    assert out.shape == (20, 10, 3) and out[:5].mean() > 200 and out[-5:].mean() < 50
