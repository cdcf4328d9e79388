"""Real data: a JSONL manifest of file paths, validated record by record.

One line per record (the schema; README "Manifest format" and ``focusdpo dip build --help`` say the same)::

    {"prompt": str,                                   required
     "target": path,                                  required: the positive photo, K subjects
     "references": [{"image": path,                   required, one per subject (K = their number), in order
                     "mask": path,                    optional: the subject in the reference
                     "class": str}, ...],             optional: the subject's class words ("dog", "stuffed
                                                      animal"), the detector's query with --auto-masks
     "target_masks": [path, ...],                     optional: one mask per reference, P_k in reference order
     "target_boxes": [[x0, y0, x1, y1], ...],         optional: one pixel box per reference in the target (for
                                                      --auto-masks: where each subject is; no detector needed)
     "id": str}                                       optional: unique; default "line<N>"

A mask is an image file of its image's size: a pixel > 127 (any channel) is the subject, and it must not be
empty. Paths are relative to the manifest's folder (the root; ``--root DIR`` names another) and may not leave
it, symlinks included.

Without masks: a reference without a mask gets an all-ones mask (unknown), and a record without
``target_masks`` is rejected unless ``auto_masks`` is on. With ``auto_masks`` (an
:class:`focusdpo.data.automask.AutoMasker`, or True for GrabCut) the missing masks are made automatically, for
references (one subject each) and for targets of K subjects (:mod:`focusdpo.data.automask`: a promptable
detector + segmenter, or GrabCut); an automatic mask covering under 1 % or over 95 % of its image is a failure
and rejects the record. The provenance's ``mask_origin`` says where each mask came from (``file``,
``unknown``, ``models``, ``models-boxes``, ``grabcut``, ``grabcut-boxes|components|strips``) and ``fallback``
why the models were not used for a record.

Every problem raises :class:`BadRecord` with a reason that names the file and the fix; the builder lists it in
``rejected.jsonl`` and goes on. Whatever exception a line raises (a NUL byte in a path, JSON nested too deep
to parse) becomes a :class:`BadRecord` of that line. The manifest must be UTF-8 (a UTF-8 BOM is allowed): a
UTF-16/32 file is refused as a whole and a line that is not valid UTF-8 is rejected with the offending byte,
never stored with replacement characters. High-bit-depth images (16-bit greyscale PNG, 32-bit integer or float
modes) are scaled to 8 bits rather than clipped. The target and its masks are centre-cropped to a multiple of
the token patch (the crop is recorded in the record's provenance).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from focusdpo.data.automask import AUTO_MASK_AREA, AutoMasker, MaskFailure  # noqa: F401 - AUTO_MASK_AREA kept here

KEYS = ("prompt", "target", "references", "target_masks", "target_boxes", "id")
REF_KEYS = ("image", "mask", "class")


class BadRecord(ValueError):
    """A manifest record cannot be used; ``str(err)`` is the reason (file, problem, fix)."""


@dataclass
class ManifestEntry:
    """One parsed manifest line, paths resolved inside the root."""

    line: int
    id: str
    prompt: str
    target: Path
    target_masks: list[Path] | None
    references: list[Path]
    ref_masks: list[Path | None]
    raw: dict[str, Any] = field(default_factory=dict)
    classes: list[str | None] = field(default_factory=list)
    target_boxes: list[tuple[float, float, float, float]] | None = None


@dataclass
class LoadedEntry:
    """The pixels of an entry.

    Attributes:
        image: uint8 ``[H, W, 3]`` target (cropped to multiples of the patch).
        regions: bool ``[K, H, W]``.
        references: K uint8 ``[h_k, w_k, 3]``; ref_masks: K bool ``[h_k, w_k]``.
        provenance: JSON-serialisable: relative paths, mask origins (file, grabcut, unknown), crop box.
    """

    image: np.ndarray
    regions: np.ndarray
    references: list[np.ndarray]
    ref_masks: list[np.ndarray]
    provenance: dict[str, Any]


def manifest_root(path: str | Path, root: str | Path | None = None) -> Path:
    """The folder manifest paths are relative to: ``root`` when given, else the manifest's folder (resolved)."""
    base = Path(path).resolve().parent if root is None else Path(root).expanduser().resolve()
    if not base.is_dir():
        raise FileNotFoundError(f"manifest root {base} is not a folder; pass an existing --root")
    return base


# Byte-order marks of encodings a JSONL manifest may not use (checked longest first).
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"), (b"\xff\xfe", "UTF-16-LE"),
         (b"\xfe\xff", "UTF-16-BE"))


def check_encoding(path: str | Path) -> None:
    """Refuse a manifest encoded in UTF-16/32 (by its byte-order mark, or NUL bytes in its first line)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for bom, name in _BOMS:
        if head.startswith(bom):
            raise ValueError(f"manifest {path} is encoded in {name}; re-save it as UTF-8 (one JSON object a line)")
    if b"\x00" in head.split(b"\n", 1)[0]:
        raise ValueError(f"manifest {path} holds NUL bytes in its first line (UTF-16 without a byte-order mark?); "
                         f"re-save it as UTF-8")


def _decode_line(raw: bytes, n: int) -> str:
    """A manifest line as text; :class:`BadRecord` naming the byte and the likely encoding when not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1]
        guess = "Latin-1 or Windows-1252" if bad and bad[0] >= 0x80 else "not UTF-8"
        raise BadRecord(f"line {n} is not UTF-8 (byte 0x{bad.hex()} at column {e.start + 1}; the file looks "
                        f"{guess}): re-save the manifest as UTF-8") from e


def read_manifest(path: str | Path, root: str | Path | None = None
                  ) -> Iterator[tuple[int, dict[str, Any] | str, ManifestEntry | BadRecord]]:
    """Yield ``(line number, raw object or text, entry or the BadRecord)`` for each non-empty line.

    Paths are relative to ``root`` (None: the manifest's folder) and must stay inside it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist; give a JSONL file (one record per line)")
    check_encoding(path)
    root = manifest_root(path, root)
    seen: set[str] = set()
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = _decode_line(raw, n)
                obj = _parse_json(text, n)
            except BadRecord as e:
                yield n, raw.decode("utf-8", errors="backslashreplace").rstrip("\n"), e
                continue
            try:
                entry = _checked_entry(obj, n, root)
                if entry.id in seen:
                    raise BadRecord(f"id {entry.id!r} is used by an earlier line; give each record a unique id")
                seen.add(entry.id)
                yield n, obj, entry
            except BadRecord as e:
                yield n, obj, e


def _parse_json(text: str, n: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(f"line {n} is not valid JSON ({e.msg}); fix the line") from e
    except RecursionError as e:
        raise BadRecord(f"line {n} is JSON nested too deeply to read; fix the line") from e
    except Exception as e:  # noqa: BLE001 - whatever one line raises rejects that line only
        raise BadRecord(f"line {n} cannot be parsed ({type(e).__name__}: {e}); fix the line") from e


def _checked_entry(obj: Any, n: int, root: Path) -> ManifestEntry:
    """:func:`parse_entry`, with any unexpected exception of one line turned into its :class:`BadRecord`."""
    try:
        return parse_entry(obj, n, root)
    except BadRecord:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. ValueError "embedded null byte" from a path
        raise BadRecord(f"line {n} cannot be used ({type(e).__name__}: {e}); fix the line") from e


def parse_entry(obj: Any, line: int, root: Path) -> ManifestEntry:
    """Check one manifest object's keys and types and resolve its paths inside ``root``."""
    if not isinstance(obj, dict):
        raise BadRecord(f"line {line} is a {type(obj).__name__}; each line must be a JSON object")
    unknown = set(obj) - set(KEYS)
    if unknown:
        raise BadRecord(f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(KEYS)}")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise BadRecord("'prompt' must be a non-empty string")
    refs = obj.get("references")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, dict) and "image" in r for r in refs):
        raise BadRecord("'references' must be a non-empty list of {\"image\": path, \"mask\": path (optional), "
                        "\"class\": str (optional)}")
    for i, r in enumerate(refs):
        if set(r) - set(REF_KEYS):
            raise BadRecord(f"references[{i}] has unknown key(s) {sorted(set(r) - set(REF_KEYS))}; allowed: "
                            f"{', '.join(REF_KEYS)}")
        if "class" in r and (not isinstance(r["class"], str) or not r["class"].strip()):
            raise BadRecord(f"references[{i}].class must be a non-empty string (the subject's class words), "
                            f"got {r['class']!r}")
    masks = obj.get("target_masks")
    if masks is not None and (not isinstance(masks, list) or len(masks) != len(refs)):
        raise BadRecord(f"'target_masks' must list one mask per reference ({len(refs)}), got {masks!r}")
    boxes = _boxes(obj.get("target_boxes"), len(refs))
    rid = obj.get("id", f"line{line:06d}")
    if not isinstance(rid, str) or not rid:
        raise BadRecord(f"'id' must be a non-empty string, got {rid!r}")
    return ManifestEntry(
        line=line, id=rid, prompt=obj["prompt"], target=resolve_inside(root, obj.get("target"), "target"),
        target_masks=None if masks is None else [resolve_inside(root, m, f"target_masks[{i}]")
                                                 for i, m in enumerate(masks)],
        references=[resolve_inside(root, r["image"], f"references[{i}].image") for i, r in enumerate(refs)],
        ref_masks=[None if r.get("mask") is None else resolve_inside(root, r["mask"], f"references[{i}].mask")
                   for i, r in enumerate(refs)],
        raw=obj, classes=[r["class"].strip() if "class" in r else None for r in refs], target_boxes=boxes)


def _boxes(boxes: Any, k: int) -> list[tuple[float, float, float, float]] | None:
    """``target_boxes`` checked: None, or K ``[x0, y0, x1, y1]`` with x0 < x1 and y0 < y1 (pixels, >= 0)."""
    if boxes is None:
        return None
    ok = isinstance(boxes, list) and len(boxes) == k and all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                    and v >= 0 for v in b) and b[0] < b[2] and b[1] < b[3]
        for b in boxes)
    if not ok:
        raise BadRecord(f"'target_boxes' must list one [x0, y0, x1, y1] pixel box per reference ({k}) with "
                        f"0 <= x0 < x1 and 0 <= y0 < y1, got {boxes!r}")
    return [tuple(float(v) for v in b) for b in boxes]  # type: ignore[misc]


def resolve_inside(root: Path, rel: Any, name: str) -> Path:
    """``root / rel`` resolved (symlinks followed); raises unless it stays inside ``root``."""
    if not isinstance(rel, str) or not rel:
        raise BadRecord(f"{name} must be a path string, got {rel!r}")
    if "\x00" in rel:
        raise BadRecord(f"{name} {rel!r} holds a NUL byte; fix the path")
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise BadRecord(f"{name} {rel!r} leaves the manifest's root {root}; keep every file under it "
                        "(or pass --root DIR, a folder that holds them all)")
    return path


def load_image(path: Path, name: str, max_pixels: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of an image file, EXIF orientation applied (as viewers and mask tools show it).

    Raises :class:`BadRecord` when the file is missing, unreadable or truncated, or over ``max_pixels`` (checked
    from the header, before decoding).
    """
    if not path.is_file():
        raise BadRecord(f"{name} {path} is missing; fix the path or add the file")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadRecord(f"{name} {path} has {w}x{h} = {w * h} pixels, over the limit {max_pixels}; "
                                "downscale it or raise data.max_pixels")
            im.load()
            return to_rgb8(ImageOps.exif_transpose(im))
    except BadRecord:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, struct.error...) is bad input
        raise BadRecord(f"{name} {path} cannot be read ({type(e).__name__}: {e}); "
                        "replace the file with a valid image") from e


def to_rgb8(im: Image.Image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of any PIL image; high-bit-depth greyscale modes are scaled, not clipped.

    ``I;16*`` (16-bit PNG/TIFF) and ``I`` (32-bit int, how some Pillow versions open 16-bit PNGs) are divided by
    257 (65535 -> 255); ``F`` is taken as [0, 1] when its maximum is <= 1, else as 16-bit.
    """
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and np.nanmax(arr, initial=0.0) <= 1.0:
            arr = arr * 255.0
        else:
            arr = arr / 257.0
        grey = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB")).copy()


def load_mask(path: Path, name: str, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """bool ``[H, W]`` (pixel > 127) of a mask file that must have ``size`` (H, W) and be non-empty."""
    img = load_image(path, name, max_pixels)
    mask = img.max(axis=-1) > 127
    if mask.shape != tuple(size):
        raise BadRecord(f"{name} {path} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[1]}x{size[0]}; "
                        "give a mask of the image's size")
    if not mask.any():
        raise BadRecord(f"{name} {path} is empty (no pixel > 127); give a mask that covers the subject")
    return mask


def load_entry(entry: ManifestEntry, root: Path, patch: int, max_pixels: int, auto_masks: bool | AutoMasker,
               size: int | None = None, ref_size: int | None = None) -> LoadedEntry:
    """Read and check every file of ``entry``; raises :class:`BadRecord` on the first problem.

    ``auto_masks``: False (no automatic masks), True (GrabCut) or the build's :class:`AutoMasker`.
    ``size`` / ``ref_size``: when given, the target / each reference (with its masks) is resized so that its
    shorter side has that many pixels (Lanczos for images, nearest for masks) and centre-cropped to a square.
    References are read first: their masks order the target's automatic masks.
    """
    masker = AutoMasker() if auto_masks is True else (auto_masks or None)
    queries = _queries(entry)
    refs, ref_masks, ref_origin, fallback = [], [], [], {}
    for i, (rp, mp) in enumerate(zip(entry.references, entry.ref_masks, strict=True)):
        ref = load_image(rp, f"references[{i}].image", max_pixels)
        if mp is not None:
            mask, origin = load_mask(mp, f"references[{i}].mask", ref.shape[:2], max_pixels), "file"
        elif masker is not None:
            mask, origin, why = _auto(lambda: masker.reference(ref, queries[i]), f"references[{i}]")  # noqa: B023
            if why:
                fallback[f"references[{i}]"] = why
        else:
            mask, origin = np.ones(ref.shape[:2], bool), "unknown"
        refs.append(ref)
        ref_masks.append(mask)
        ref_origin.append(origin)
    image, regions, target_origin = _load_target(entry, max_pixels, masker, queries, refs, ref_masks, fallback)
    if ref_size is not None:
        for i in range(len(refs)):
            refs[i], masks = square_resize(refs[i], ref_masks[i][None], ref_size)
            ref_masks[i] = masks[0]
            if not ref_masks[i].any():
                raise BadRecord(f"references[{i}].mask is empty after the centre crop to {ref_size} px; "
                                "give a reference with the subject nearer the centre")
    if size is not None:
        image, regions = square_resize(image, regions, size)
    image, regions, crop = _crop_to_patch(image, regions, patch)
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    origin = {"target_masks": target_origin, "references": ref_origin, **({"fallback": fallback} if fallback else {})}
    prov = {"builder": "manifest", "line": entry.line, "target": rel(entry.target),
            "references": [rel(p) for p in entry.references], "mask_origin": origin,
            "resize": [size, ref_size], "crop": crop}
    return LoadedEntry(image, regions, refs, ref_masks, prov)


def _queries(entry: ManifestEntry) -> list[str | None]:
    """The detector's query of each subject: the reference's ``class``, else the prompt's subject phrase."""
    from focusdpo.data.automask import prompt_subjects

    k = len(entry.references)
    phrases = prompt_subjects(entry.prompt, k) or [None] * k
    classes = entry.classes or [None] * k
    return [c if c is not None else p for c, p in zip(classes, phrases, strict=True)]


def _auto(make, name: str):
    """Run one automatic mask; its :class:`MaskFailure` becomes the record's :class:`BadRecord`."""
    try:
        return make()
    except MaskFailure as e:
        raise BadRecord(f"{name}: {e}") from e


def _load_target(entry: ManifestEntry, max_pixels: int, masker: AutoMasker | None, queries: list[str | None],
                 refs: list[np.ndarray], ref_masks: list[np.ndarray], fallback: dict[str, str]
                 ) -> tuple[np.ndarray, np.ndarray, str]:
    """The target uint8 [H, W, 3], its regions bool [K, H, W] and where they came from (``mask_origin``)."""
    image = load_image(entry.target, "target", max_pixels)
    if entry.target_masks is not None:
        regions = np.stack([load_mask(p, f"target_masks[{i}]", image.shape[:2], max_pixels)
                            for i, p in enumerate(entry.target_masks)])
        return image, regions, "file"
    if masker is None:
        raise BadRecord("no 'target_masks'; give one mask per reference, or pass --auto-masks")
    boxes = entry.target_boxes
    if boxes is not None and any(b[2] > image.shape[1] or b[3] > image.shape[0] for b in boxes):
        raise BadRecord(f"target_boxes {boxes} reach outside the {image.shape[1]}x{image.shape[0]} target; give "
                        "boxes in its pixels")
    regions, origin, why = _auto(lambda: masker.target(image, queries, refs, ref_masks, boxes), "target")
    if why:
        fallback["target"] = why
    return image, regions, origin


def square_resize(image: np.ndarray, masks: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize uint8 ``[H, W, 3]`` and bool ``[K, H, W]`` so the shorter side is ``side``, centre-crop to square.

    Images use Lanczos, masks nearest neighbour (they stay hard). Returns ``([side, side, 3], [K, side, side])``.
    """
    h, w = image.shape[:2]
    scale = side / min(h, w)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    top, left = (nh - side) // 2, (nw - side) // 2
    box = (left, top, left + side, top + side)
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS).crop(box))
    out = [np.asarray(Image.fromarray(m).resize((nw, nh), Image.Resampling.NEAREST).crop(box)) for m in masks]
    return img, np.stack(out).astype(bool)


def _crop_to_patch(image: np.ndarray, regions: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Centre-crop to multiples of ``patch``; returns the crop box [top, left, height, width]."""
    h, w = image.shape[:2]
    ch, cw = h // patch * patch, w // patch * patch
    if ch == 0 or cw == 0:
        raise BadRecord(f"target is {w}x{h}, smaller than one {patch}x{patch} token; use a larger image")
    top, left = (h - ch) // 2, (w - cw) // 2
    regions = regions[:, top:top + ch, left:left + cw]
    empty = [i for i in range(regions.shape[0]) if not regions[i].any()]
    if empty:
        raise BadRecord(f"target mask(s) {empty} are empty after cropping to multiples of {patch} px; "
                        "give masks that cover the subject away from the border")
    return image[top:top + ch, left:left + cw], regions, [top, left, ch, cw]
