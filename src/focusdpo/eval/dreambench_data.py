"""DreamBench data: the evaluation lists, their mapping onto a local copy, and the fetch for users with a network.

Layout of a DreamBench folder (``--data DIR``), as ``focusdpo data dreambench --dest DIR`` writes it::

    DIR/dataset/<subject>/NN.jpg           the reference photos of the 30 subjects (google/dreambooth)
    DIR/prompts_and_classes.txt            subject -> class noun, and the prompt templates
    DIR/uno_dreambench_singleip.json       750 entries {"prompt", "image_paths": [1 path]}   (bytedance/UNO)
    DIR/uno_dreambench_multiip.json        750 entries {"prompt", "image_paths": [2 paths]}

The paths inside the UNO lists are UNO repository paths (``./dreambooth/dataset/<subject>/NN.jpg``); they are
mapped onto ``DIR/dataset/<subject>/NN.jpg``. The entry index (position in the list) names the generated images
(see :mod:`focusdpo.eval.dreambench`).
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

LISTS = {"dreambench-single": "uno_dreambench_singleip.json", "dreambench-multi": "uno_dreambench_multiip.json"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Public sources (fetched only by `focusdpo data dreambench`, never by tests).
DREAMBOOTH_ZIP = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
UNO_LISTS_URL = "https://raw.githubusercontent.com/bytedance/UNO/main/datasets/"
UNO_LIST_URLS = {
    "uno_dreambench_singleip.json": UNO_LISTS_URL + "dreambench_singleip.json",
    "uno_dreambench_multiip.json": UNO_LISTS_URL + "dreambench_multiip.json",
}
DREAMBOOTH_FILES = ("prompts_and_classes.txt", "references_and_licenses.txt")


class DreamBenchDataError(ValueError):
    """A DreamBench folder or list is missing or malformed; the message names the file or entry and the fix."""


@dataclass(frozen=True)
class Entry:
    """One prompt of a DreamBench list.

    ``index`` is the position in the list; ``subjects`` and ``references`` are in list order (one per subject);
    ``references`` are local paths (the fixed per-subject image of the "Kosmos-G" reference setting).
    """

    index: int
    prompt: str
    subjects: tuple[str, ...]
    references: tuple[Path, ...]


def _map_path(data_dir: Path, raw: str, where: str) -> tuple[str, Path]:
    """``./dreambooth/dataset/<subject>/NN.jpg`` -> (subject, ``data_dir/dataset/<subject>/NN.jpg``)."""
    parts = PurePosixPath(raw).parts
    if "dataset" not in parts or len(parts) < parts.index("dataset") + 3 or ".." in parts:
        raise DreamBenchDataError(f"{where}: image path {raw!r} is not of the form .../dataset/<subject>/<file>; "
                                  "use an unmodified UNO DreamBench list")
    i = parts.index("dataset")
    subject, name = parts[i + 1], parts[i + 2]
    return subject, data_dir / "dataset" / subject / name


def load_entries(data_dir: str | Path, benchmark: str) -> list[Entry]:
    """Read the UNO list of ``benchmark`` (``dreambench-single`` | ``dreambench-multi``) from ``data_dir``.

    Every reference path is mapped onto ``data_dir/dataset`` and must exist.
    """
    data_dir = Path(data_dir)
    if benchmark not in LISTS:
        raise DreamBenchDataError(f"benchmark={benchmark!r} is invalid: allowed {', '.join(LISTS)}")
    path = data_dir / LISTS[benchmark]
    if not path.is_file():
        raise DreamBenchDataError(f"{path} not found: point --data at a DreamBench folder "
                                  "(fetch one with `focusdpo data dreambench --dest DIR`)")
    raw = json.loads(path.read_text())
    if not isinstance(raw, list) or not raw:
        raise DreamBenchDataError(f"{path}: expected a non-empty JSON list of {{prompt, image_paths}} entries")
    entries = []
    for i, item in enumerate(raw):
        where = f"{path.name} entry {i}"
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item.get("image_paths"):
            raise DreamBenchDataError(f"{where}: expected {{'prompt': str, 'image_paths': [str, ...]}}, got {item!r}")
        mapped = [_map_path(data_dir, p, where) for p in item["image_paths"]]
        for _, ref in mapped:
            if not ref.is_file():
                raise DreamBenchDataError(f"{where}: reference {ref} not found; the dataset/ folder is incomplete, "
                                          "re-fetch it with `focusdpo data dreambench`")
        entries.append(Entry(i, item["prompt"], tuple(s for s, _ in mapped), tuple(r for _, r in mapped)))
    return entries


def subject_images(data_dir: str | Path, subject: str) -> list[Path]:
    """All reference photos of ``subject`` (the "original" DreamBooth reference setting), sorted by name."""
    folder = Path(data_dir) / "dataset" / subject
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise DreamBenchDataError(f"subject {subject!r}: no images in {folder}; re-fetch the DreamBench dataset")
    return files


def read_classes(data_dir: str | Path) -> dict[str, str]:
    """Parse the ``subject_name,class`` table of ``prompts_and_classes.txt`` into {subject: class noun}."""
    path = Path(data_dir) / "prompts_and_classes.txt"
    if not path.is_file():
        raise DreamBenchDataError(f"{path} not found: fetch it with `focusdpo data dreambench`")
    classes: dict[str, str] = {}
    in_table = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if line == "subject_name,class":
            in_table = True
        elif in_table and "," in line and "=" not in line and "(" not in line:
            subject, cls = line.split(",", 1)
            classes[subject.strip()] = cls.strip()
        elif in_table and line and classes:
            break
    if not classes:
        raise DreamBenchDataError(f"{path}: no 'subject_name,class' table found")
    return classes


def extract_dreambooth_zip(archive: bytes | Path, dest: Path) -> int:
    """Unpack the google/dreambooth repository archive: ``dataset/`` and the two text files into ``dest``.

    Returns the number of images written. Members outside those paths are ignored; a member whose path
    would escape ``dest`` is an error.
    """
    data = archive.read_bytes() if isinstance(archive, Path) else archive
    n_images = 0
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts[1:]  # drop the "dreambooth-main/" top folder
            if info.is_dir() or not parts or ".." in parts:
                continue
            keep = (parts[0] == "dataset" and len(parts) == 3) or (len(parts) == 1 and parts[0] in DREAMBOOTH_FILES)
            if not keep:
                continue
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(dest.resolve()):
                raise DreamBenchDataError(f"archive member {info.filename!r} escapes {dest}; archive is corrupt")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n_images += parts[0] == "dataset" and target.suffix.lower() in IMAGE_SUFFIXES
    return n_images


def _download(url: str, timeout: float = 120.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https URLs above)
        return resp.read()


def fetch_dreambench(dest: str | Path) -> dict[str, int]:
    """Download DreamBench (google/dreambooth, CC BY 4.0) and the UNO evaluation lists into ``dest``.

    Needs a network. Returns counts: images, and entries of each list (validated by :func:`load_entries`).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    n_images = extract_dreambooth_zip(_download(DREAMBOOTH_ZIP), dest)
    for name, url in UNO_LIST_URLS.items():
        (dest / name).write_bytes(_download(url))
    counts = {"images": n_images}
    for benchmark in LISTS:
        counts[benchmark] = len(load_entries(dest, benchmark))
    return counts
