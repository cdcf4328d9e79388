"""DreamBench lists and fetch parsing: the shared copy parses to the published counts; the archive unpacking and
path mapping reject what they must."""

import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from focusdpo.eval.dreambench_data import (
    DreamBenchDataError,
    extract_dreambooth_zip,
    load_entries,
    read_classes,
    subject_images,
)
from shared_data import DREAMBENCH as SHARED
from shared_data import needs_dreambench as needs_shared


@needs_shared
@pytest.mark.parametrize(("benchmark", "k"), [("dreambench-single", 1), ("dreambench-multi", 2)])
def test_shared_lists_parse_to_protocol_counts(benchmark, k):
    entries = load_entries(SHARED, benchmark)
    assert len(entries) == 750
    assert [e.index for e in entries] == list(range(750))
    assert {len(e.subjects) for e in entries} == {k}
    groups = Counter(e.subjects for e in entries)
    assert len(groups) == 30 and set(groups.values()) == {25}  # 30 subjects (pairs) x 25 prompts
    for e in entries:
        for s, ref in zip(e.subjects, e.references, strict=True):
            assert ref.is_file() and ref.parent == SHARED / "dataset" / s


@needs_shared
def test_shared_single_list_first_entry_maps_onto_dataset():
    e = load_entries(SHARED, "dreambench-single")[0]
    assert e.prompt == "a backpack in the jungle"
    assert e.subjects == ("backpack",) and e.references == (SHARED / "dataset" / "backpack" / "02.jpg",)


@needs_shared
def test_shared_classes_and_subject_images():
    classes = read_classes(SHARED)
    assert len(classes) == 30
    assert classes["bear_plushie"] == "stuffed animal" and classes["dog6"] == "dog" and classes["can"] == "can"
    assert set(classes) == {p.name for p in (SHARED / "dataset").iterdir() if p.is_dir()}
    assert sum(len(subject_images(SHARED, s)) for s in classes) == 158  # the README's photo count


def _write_list(root: Path, items: list) -> None:
    (root / "uno_dreambench_singleip.json").write_text(json.dumps(items))


def test_bad_entries_are_named(tmp_path):
    (tmp_path / "dataset" / "cat").mkdir(parents=True)
    (tmp_path / "dataset" / "cat" / "00.jpg").write_bytes(b"x")
    _write_list(tmp_path, [{"prompt": "a cat", "image_paths": ["./dreambooth/dataset/cat/00.jpg"]},
                           {"prompt": "a cat", "image_paths": ["./dreambooth/dataset/cat/07.jpg"]}])
    with pytest.raises(DreamBenchDataError, match="entry 1: reference .*07.jpg not found"):
        load_entries(tmp_path, "dreambench-single")
    _write_list(tmp_path, [{"prompt": "a cat", "image_paths": ["../../etc/passwd"]}])
    with pytest.raises(DreamBenchDataError, match="entry 0: image path"):
        load_entries(tmp_path, "dreambench-single")
    _write_list(tmp_path, [{"prompt": 3}])
    with pytest.raises(DreamBenchDataError, match="entry 0: expected"):
        load_entries(tmp_path, "dreambench-single")
    with pytest.raises(DreamBenchDataError, match="not found: point --data"):
        load_entries(tmp_path, "dreambench-multi")
    with pytest.raises(DreamBenchDataError, match="benchmark='toy'"):
        load_entries(tmp_path, "toy")


def test_extract_keeps_dataset_and_text_files_only(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dreambooth-main/dataset/cat/00.jpg", b"jpeg-bytes")
        zf.writestr("dreambooth-main/dataset/cat/01.jpg", b"jpeg-2")
        zf.writestr("dreambooth-main/prompts_and_classes.txt", "subject_name,class\ncat,cat\n")
        zf.writestr("dreambooth-main/README.md", "ignored")
        zf.writestr("dreambooth-main/dataset/../../evil.txt", "escape")
        zf.writestr("dreambooth-main/dataset/deep/a/b.jpg", b"too deep")
    n = extract_dreambooth_zip(buf.getvalue(), tmp_path)
    assert n == 2
    assert (tmp_path / "dataset" / "cat" / "00.jpg").read_bytes() == b"jpeg-bytes"
    assert read_classes(tmp_path) == {"cat": "cat"}
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["dataset/cat/00.jpg", "dataset/cat/01.jpg", "prompts_and_classes.txt"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_fetch_command_with_a_stubbed_network(tmp_path, monkeypatch):
    """The whole `focusdpo data dreambench` path, with the two downloads served from local bytes."""
    from typer.testing import CliRunner

    from focusdpo.cli import app
    from focusdpo.eval import dreambench_data

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for s in ("cat", "dog"):
            zf.writestr(f"dreambooth-main/dataset/{s}/00.jpg", b"jpeg")
        zf.writestr("dreambooth-main/prompts_and_classes.txt", "subject_name,class\ncat,cat\ndog,dog\n")
    single = [{"prompt": "a cat", "image_paths": ["./dreambooth/dataset/cat/00.jpg"]}]
    multi = [{"prompt": "a cat and a dog", "image_paths": ["./dreambooth/dataset/cat/00.jpg",
                                                           "./dreambooth/dataset/dog/00.jpg"]}] * 2
    served = {dreambench_data.DREAMBOOTH_ZIP: buf.getvalue(),
              dreambench_data.UNO_LIST_URLS["uno_dreambench_singleip.json"]: json.dumps(single).encode(),
              dreambench_data.UNO_LIST_URLS["uno_dreambench_multiip.json"]: json.dumps(multi).encode()}
    monkeypatch.setattr(dreambench_data, "_download", lambda url, timeout=120.0: served[url])
    result = CliRunner().invoke(app, ["data", "dreambench", "--dest", str(tmp_path / "db")])
    assert result.exit_code == 0, result.output
    assert "'images': 2, 'dreambench-single': 1, 'dreambench-multi': 2" in result.output
    assert load_entries(tmp_path / "db", "dreambench-multi")[1].subjects == ("cat", "dog")
