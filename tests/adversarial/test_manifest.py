"""Hostile manifests and failing rebuilds (issue 15 points 1 and 5): every bad line is a `rejected.jsonl` entry
with its line number, the good lines are written, and a rebuild that fails never costs the previous set."""

from __future__ import annotations

import errno
import json
import os
import sys

import numpy as np
import pytest
from dip_fixtures import make_scene
from PIL import Image
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import load_config
from focusdpo.data import build_manifest_dip, read_records
from focusdpo.data import builder as builder_mod
from focusdpo.data import sources as sources_mod
from focusdpo.data.builder import BuildStopped
from focusdpo.data.parquet import ShardWriter

CFG = ["data.max_pixels=4096"]


def _line(i: int, **change) -> dict:
    return {"prompt": f"two things {i}", "target": f"t{i}.png", "id": f"good{i}",
            "target_masks": [f"m{i}{j}.png" for j in range(2)],
            "references": [{"image": f"r{i}{j}.png"} for j in range(2)], **change}


def _files(root, n: int) -> None:
    """Target, masks and references of scenes 0..n-1 under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, regions = make_scene(i, 2, size=32)
        Image.fromarray(img).save(root / f"t{i}.png")
        for j in range(2):
            Image.fromarray(regions[j].astype(np.uint8) * 255).save(root / f"m{i}{j}.png")
            Image.fromarray(img[:16, :16]).save(root / f"r{i}{j}.png")


def _manifest(root, lines: list, name: str = "set.jsonl"):
    """Write ``lines`` (dicts as JSON, bytes as they are) one per line."""
    path = root / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


def _build(manifest, out, *extra: str, **kw):
    return build_manifest_dip(load_config(None, [*CFG, *extra]), manifest, out, seed=1, patch=8, **kw)


def _set(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _rejected(out) -> list[dict]:
    return [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]


@pytest.fixture
def good_set(tmp_path):
    """A 4-record set in ``out`` built from ``m/set.jsonl``: (manifest, out)."""
    _files(tmp_path / "m", 4)
    manifest = _manifest(tmp_path / "m", [_line(i) for i in range(4)])
    out = tmp_path / "out"
    assert _build(manifest, out).written == 4
    return manifest, out


def _stage(out):
    return out.with_name(f".{out.name}.building-{os.getpid()}")


def test_rebuild_that_rejects_every_record_keeps_the_previous_set(good_set, tmp_path) -> None:
    manifest, out = good_set
    before = _set(out)
    bad = _manifest(tmp_path / "m", [_line(i, target="nope.png") for i in range(3)], "bad.jsonl")
    with pytest.raises(BuildStopped, match=r"rejected every record .*rejected.jsonl.*keeps its previous set"):
        _build(bad, out, overwrite=True)
    assert _set(out) == before
    assert [r["line"] for r in _rejected(_stage(out))] == [1, 2, 3]
    result = CliRunner().invoke(app, ["dip", "build", "--manifest", str(bad), "--out", str(out), "--patch", "8",
                                      "--overwrite", *CFG])
    assert result.exit_code == 2 and "keeps its previous set" in result.output and "Traceback" not in result.output
    assert _set(out) == before


def test_full_disk_mid_rebuild_keeps_the_old_set_and_the_accepted_records(good_set, monkeypatch) -> None:
    manifest, out = good_set
    before = _set(out)
    real, calls = ShardWriter._flush, []

    def flush(self):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.out_dir / "data-00002.parquet"))
        real(self)

    monkeypatch.setattr(ShardWriter, "_flush", flush)
    with pytest.raises(BuildStopped, match=rf"No space left on device writing .*data-00002.parquet.*kept in "
                                           rf"{_stage(out)}.*{out} is unchanged"):
        _build(manifest, out, "data.shard_records=1", overwrite=True)
    assert _set(out) == before
    card = json.loads((_stage(out) / "card.json").read_text())
    kept = [r.id for r in read_records(_stage(out))]
    assert card["complete"] is False and card["records"] == len(kept) >= 2 and kept[:2] == ["good0", "good1"]


def test_interrupt_flushes_the_pending_records(tmp_path, monkeypatch) -> None:
    _files(tmp_path / "m", 4)
    manifest = _manifest(tmp_path / "m", [_line(i) for i in range(4)])
    real = sources_mod.load_entry

    def load(entry, *args):
        if entry.line == 3:
            raise KeyboardInterrupt
        return real(entry, *args)

    monkeypatch.setattr(sources_mod, "load_entry", load)
    out = tmp_path / "out"
    with pytest.raises(BuildStopped, match=f"interrupted.*kept in {_stage(out)}"):
        _build(manifest, out)
    assert not out.exists()
    assert [r.id for r in read_records(_stage(out))] == ["good0", "good1"]  # pending M_d batch written, not lost


def test_every_per_line_failure_is_a_rejection_with_its_line(tmp_path, monkeypatch) -> None:
    _files(tmp_path / "m", 6)
    deep = b"[" * 100_000 + b"]" * 100_000
    latin1 = json.dumps(_line(3, prompt="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    lines = [_line(0), _line(1, target="t1\u0000.png"), deep, latin1, _line(4), _line(5, id="boom")]
    real = builder_mod.disrupt

    def disrupt(cand, mix):
        if cand.id == "boom":
            raise RuntimeError("plug-in crashed")
        return real(cand, mix)

    monkeypatch.setattr(builder_mod, "disrupt", disrupt)
    out = tmp_path / "out"
    s = _build(_manifest(tmp_path / "m", lines), out)
    assert [r.id for r in read_records(out)] == ["good0", "good4"] and s.written == 2
    reasons = {r["line"]: r["reason"] for r in _rejected(out)}
    assert sorted(reasons) == [2, 3, 4, 6]
    assert "NUL byte" in reasons[2] and "target" in reasons[2]
    assert "line 3 is JSON nested too deeply" in reasons[3]
    assert "line 4 is not UTF-8 (byte 0xe9" in reasons[4] and "Latin-1" in reasons[4]
    assert "RuntimeError: plug-in crashed" in reasons[6]


def test_utf16_manifest_is_refused_naming_the_encoding(tmp_path) -> None:
    _files(tmp_path / "m", 1)
    path = tmp_path / "m" / "set.jsonl"
    path.write_text(json.dumps(_line(0)) + "\n", encoding="utf-16")
    result = CliRunner().invoke(app, ["dip", "build", "--manifest", str(path), "--out", str(tmp_path / "out"),
                                      "--patch", "8", *CFG])
    assert result.exit_code == 2 and f"manifest {path} is encoded in UTF-16-LE" in result.output
    assert "re-save it as UTF-8" in result.output and not (tmp_path / "out").exists()


def test_auto_masks_without_opencv_fails_before_the_build(tmp_path, monkeypatch) -> None:
    _files(tmp_path / "m", 1)
    manifest = _manifest(tmp_path / "m", [_line(0)])
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError, as without OpenCV
    result = CliRunner().invoke(app, ["dip", "build", "--manifest", str(manifest), "--out", str(tmp_path / "out"),
                                      "--patch", "8", "--auto-masks", *CFG])
    assert result.exit_code == 2 and "pip install 'focusdpo[masks]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_16_bit_images_are_scaled_not_clipped(tmp_path) -> None:
    root = tmp_path / "m"
    _files(root, 1)
    img, _ = make_scene(0, 2, size=32)
    grey = img.mean(axis=-1).round().astype(np.uint16)
    Image.fromarray(grey * 257).save(root / "t16.png")  # 16-bit greyscale PNG
    ref = np.full((16, 16), 128 * 257, np.uint16)
    ref[4:12, 4:12] = 40 * 257
    Image.fromarray(ref).save(root / "r16.png")
    with Image.open(root / "t16.png") as im:
        assert im.mode.startswith("I")  # really high bit depth
    line = _line(0, target="t16.png", references=[{"image": "r16.png"}, {"image": "r01.png"}])
    out = tmp_path / "out"
    assert _build(_manifest(root, [line]), out).written == 1
    rec = next(iter(read_records(out)))
    assert np.array_equal(rec.positive, np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1))
    assert np.array_equal(rec.references[0][..., 0], (ref // 257).astype(np.uint8))


def test_overwrite_keeps_other_files_and_out_as_a_file_is_named(good_set, tmp_path) -> None:
    manifest, out = good_set
    (out / "notes.txt").write_text("mine")
    smaller = _manifest(tmp_path / "m", [_line(i) for i in range(2)], "small.jsonl")
    assert _build(smaller, out, overwrite=True).out_dir == out
    assert [r.id for r in read_records(out)] == ["good0", "good1"] and (out / "notes.txt").read_text() == "mine"
    assert not _stage(out).exists() and not list(tmp_path.glob(".out.replaced-*"))
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match=f"--out {target} is a file"):
        _build(manifest, target)
