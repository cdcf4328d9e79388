"""DreamBench scoring: DINO, CLIP-I and CLIP-T of a folder of generated images against the references.

Protocol (published practice, the README of the DreamBench copy):

- DINO: DINO v1 ViT-S/16, CLS token of the last layer; resize the shorter side to 256 (bicubic), center-crop
  224, ImageNet mean/std. (The crop is the model's ``image_size``; the resize keeps the 256/224 ratio.)
- CLIP-I / CLIP-T: CLIP ViT-B/32 image and text embeddings; resize the shorter side to 224 (bicubic),
  center-crop 224, CLIP mean/std; CLIP-T uses the list's prompt, which already names the class noun.
- Similarities are cosines of L2-normalised embeddings. For one generated image and one subject of its prompt,
  the score is the mean over that subject's references, in two reference settings: ``original`` (every photo of
  the subject in ``dataset/<subject>/``) and ``kosmos`` (the one fixed photo the UNO list names, the Kosmos-G
  setting). Multi-subject images are scored against each subject separately (one row per image and subject).
- Averaging: image score = mean over its subjects; group score = mean over the images of one reference group
  (a subject for the single-subject list, a subject pair for the multi-subject list); benchmark score = mean
  over groups. With the balanced lists this is "per subject, then over subjects" (single) and "each reference
  subject separately, then averaged" (multi). Per-subject means over all rows of a subject are reported too.

Generated-image naming scheme (written by ``focusdpo generate``, read here)::

    <index:03d>_<subject>[+<subject>...]_<seed>.png     e.g. 017_backpack_dog+bear_plushie_3407.png

``index`` is the entry's position in the UNO list; the subjects are checked against the list. UNO's own
``<index>_<j>.png`` names (``inference.py --eval_json_path``) are accepted too, without the subject check.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from focusdpo.config import Config
from focusdpo.eval.dreambench_data import IMAGE_SUFFIXES, Entry, load_entries, subject_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SETTINGS = ("original", "kosmos")

_OURS = re.compile(r"^(\d+)_([A-Za-z0-9_]+(?:\+[A-Za-z0-9_]+)*)_(\d+)$")
_UNO = re.compile(r"^(\d+)_(\d+)$")


class DreamBenchError(ValueError):
    """A generated-image folder or scorer model is unusable; the message names the file and the fix."""


def image_name(entry: Entry, seed: int) -> str:
    """The file name ``focusdpo generate`` writes for ``entry`` sampled with ``seed``."""
    return f"{entry.index:03d}_{'+'.join(entry.subjects)}_{seed}.png"


def _resize_center_crop(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """Shorter side -> ``resize`` (bicubic), then the central ``crop`` x ``crop``; float [crop, crop, 3] in [0, 1]."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    nw, nh = max(resize, round(w * scale)), max(resize, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.float32) / 255.0


def _open(item: Image.Image | Path) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    try:
        with Image.open(item) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DreamBenchError(f"{item}: unreadable image ({e}); regenerate or remove it") from e


def preprocess(images: Sequence[Image.Image | Path], kind: str, crop: int) -> torch.Tensor:
    """Protocol preprocessing for ``kind`` ``dino`` or ``clip`` -> float [B, 3, crop, crop], mean/std normalised.

    ``images``: PIL images or paths (opened here, so a batch at a time is in memory).
    """
    if kind == "dino":
        resize, mean, std = round(crop * 256 / 224), IMAGENET_MEAN, IMAGENET_STD
    elif kind == "clip":
        resize, mean, std = crop, CLIP_MEAN, CLIP_STD
    else:
        raise ValueError(f"kind={kind!r} is invalid: allowed dino, clip")
    arr = np.stack([_resize_center_crop(_open(im), resize, crop) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clip_features(out: Any) -> torch.Tensor:
    """The projected embedding ``[B, D_clip]`` from ``CLIPModel.get_image_features``/``get_text_features`` of any
    transformers version: a tensor up to 4.x; from 5.0 a ``BaseModelOutputWithPooling`` whose ``pooler_output``
    holds it (reading ``.pooler_output`` on 4.57 crashed: issue 18)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class Scorer:
    """DINO and CLIP embedders; every ``embed_*`` returns L2-normalised float [B, D] on the CPU."""

    dino: torch.nn.Module
    clip: torch.nn.Module
    tokenizer: Callable
    device: torch.device
    batch_size: int = 16

    def _batched(self, items: Sequence, fn: Callable[[Sequence], torch.Tensor]) -> torch.Tensor:
        outs = [fn(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(outs).float().cpu(), dim=-1)

    @torch.no_grad()
    def embed_dino(self, images: Sequence[Image.Image | Path]) -> torch.Tensor:
        """DINO CLS embeddings of images or paths -> [B, D_dino]."""
        crop = self.dino.config.image_size

        def fn(chunk: Sequence) -> torch.Tensor:
            x = preprocess(chunk, "dino", crop).to(self.device)
            return self.dino(pixel_values=x).last_hidden_state[:, 0]
        return self._batched(images, fn)

    @torch.no_grad()
    def embed_clip_images(self, images: Sequence[Image.Image | Path]) -> torch.Tensor:
        """CLIP image embeddings (after the visual projection) -> [B, D_clip]."""
        crop = self.clip.config.vision_config.image_size

        def fn(chunk: Sequence) -> torch.Tensor:
            x = preprocess(chunk, "clip", crop).to(self.device)
            return clip_features(self.clip.get_image_features(pixel_values=x))
        return self._batched(images, fn)

    @torch.no_grad()
    def embed_clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings (after the text projection) -> [B, D_clip]."""
        max_len = self.clip.config.text_config.max_position_embeddings

        def fn(chunk: Sequence[str]) -> torch.Tensor:
            tok = self.tokenizer(list(chunk), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            return clip_features(self.clip.get_text_features(**tok))
        return self._batched(texts, fn)


def load_scorer(dino_model: str, clip_model: str, device: str | torch.device = "cpu", batch_size: int = 16) -> Scorer:
    """Load DINO (a transformers ViT ``AutoModel``) and CLIP (``CLIPModel`` + tokenizer) from paths or hub ids."""
    from transformers import AutoModel, AutoTokenizer, CLIPModel

    device = torch.device(device)
    for name, value in (("eval.dino_model", dino_model), ("eval.clip_model", clip_model)):
        looks_local = value.startswith(("/", ".", "~")) or Path(value).is_absolute()
        if looks_local and not Path(value).expanduser().is_dir():
            raise DreamBenchError(f"{name}={value!r} is not a folder: give a folder saved by save_pretrained "
                                  "or a hub id such as facebook/dino-vits16")
    try:
        dino = AutoModel.from_pretrained(dino_model)
    except OSError as e:
        raise DreamBenchError(f"eval.dino_model={dino_model!r} could not be loaded ({e}); give a local folder "
                              "saved by save_pretrained or a hub id reachable from this machine") from e
    try:
        clip = CLIPModel.from_pretrained(clip_model)
        tokenizer = AutoTokenizer.from_pretrained(clip_model)
    except OSError as e:
        raise DreamBenchError(f"eval.clip_model={clip_model!r} could not be loaded ({e}); give a local CLIP folder "
                              "(model + tokenizer) or a hub id reachable from this machine") from e
    if not hasattr(dino.config, "image_size"):
        raise DreamBenchError(f"eval.dino_model={dino_model!r} is a {type(dino).__name__} without image_size; "
                              "use a DINO ViT (facebook/dino-vits16)")
    return Scorer(dino.eval().to(device), clip.eval().to(device), tokenizer, device, batch_size)


@dataclass(frozen=True)
class Generated:
    """One generated image: its file, the list entry it answers and its sample id (seed or UNO's j)."""

    path: Path
    entry: Entry
    sample: int


def _parse(path: Path, entries: Sequence[Entry]) -> Generated:
    m_ours, m_uno = _OURS.match(path.stem), _UNO.match(path.stem)
    if not (m_ours or m_uno):
        raise DreamBenchError(f"{path.name}: not a generated-image name; expected <index>_<subjects>_<seed>.png "
                              "(focusdpo generate) or <index>_<j>.png (UNO inference.py)")
    m = m_ours or m_uno
    index = int(m.group(1))
    if index >= len(entries):
        raise DreamBenchError(f"{path.name}: index {index} is past the list's {len(entries)} entries; "
                              "was it generated for the other DreamBench list?")
    entry = entries[index]
    if m_ours and m_ours.group(2) != "+".join(entry.subjects):
        raise DreamBenchError(f"{path.name}: subjects {m_ours.group(2)!r} do not match entry {index} "
                              f"({'+'.join(entry.subjects)}); was it generated for the other DreamBench list?")
    return Generated(path, entry, int(m.group(m.lastindex)))


def index_generated(images_dir: str | Path, entries: Sequence[Entry], allow_partial: bool = False) -> list[Generated]:
    """Pair every image in ``images_dir`` with its list entry, sorted by (index, sample).

    Files that are not images (UNO's ``.json`` sidecars) are ignored. Unless ``allow_partial``, every entry
    must have at least one image.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DreamBenchError(f"--images {images_dir} is not a folder")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    generated = sorted((_parse(p, entries) for p in files), key=lambda g: (g.entry.index, g.sample))
    if not generated:
        raise DreamBenchError(f"--images {images_dir} holds no images; run `focusdpo generate` first")
    missing = sorted(set(range(len(entries))) - {g.entry.index for g in generated})
    if missing and not allow_partial:
        raise DreamBenchError(f"{len(missing)} of {len(entries)} entries have no image in {images_dir} (first: "
                              f"{missing[:5]}); generate them or pass --allow-partial to score the rest")
    return generated


def score_generated(generated: Sequence[Generated], data_dir: str | Path, scorer: Scorer) -> list[dict]:
    """One row per (generated image, subject of its prompt): DINO and CLIP-I in both settings, and CLIP-T.

    Row keys: image, index, sample, slot, subject, group, dino_original, dino_kosmos, clip_i_original,
    clip_i_kosmos, clip_t (cosines in [-1, 1]); ``group`` is the entry's subjects joined by ``+``.
    """
    paths = [g.path for g in generated]
    gen = {"dino": scorer.embed_dino(paths), "clip_i": scorer.embed_clip_images(paths)}
    prompts = sorted({g.entry.prompt for g in generated})
    text = dict(zip(prompts, scorer.embed_clip_texts(prompts), strict=True))
    fixed = sorted({r for g in generated for r in g.entry.references})
    subjects = sorted({s for g in generated for s in g.entry.subjects})
    every = {s: subject_images(data_dir, s) for s in subjects}
    all_refs = sorted(set(fixed) | {p for ps in every.values() for p in ps})
    ref = {"dino": dict(zip(all_refs, scorer.embed_dino(all_refs), strict=True)),
           "clip_i": dict(zip(all_refs, scorer.embed_clip_images(all_refs), strict=True))}
    rows = []
    for i, g in enumerate(generated):
        clip_t = float(gen["clip_i"][i] @ text[g.entry.prompt])
        for slot, (subject, fixed_ref) in enumerate(zip(g.entry.subjects, g.entry.references, strict=True)):
            row = {"image": g.path.name, "index": g.entry.index, "sample": g.sample, "slot": slot,
                   "subject": subject, "group": "+".join(g.entry.subjects)}
            for metric in ("dino", "clip_i"):
                orig = torch.stack([ref[metric][p] for p in every[subject]])
                row[f"{metric}_original"] = float((orig @ gen[metric][i]).mean())
                row[f"{metric}_kosmos"] = float(ref[metric][fixed_ref] @ gen[metric][i])
            row["clip_t"] = clip_t
            rows.append(row)
    return rows


METRICS = ("dino_original", "dino_kosmos", "clip_i_original", "clip_i_kosmos", "clip_t")


def summarize(rows: Sequence[dict]) -> dict:
    """Protocol averaging of :func:`score_generated` rows (image -> group -> benchmark; see the module docstring).

    Returns {"n_images", "n_entries", "n_groups", "dino": {"original", "kosmos"}, "clip_i": {...}, "clip_t",
    "per_group": {group: {metric: mean}}, "per_subject": {subject: {metric: mean}}}.
    """
    if not rows:
        raise DreamBenchError("no scored rows to summarise")
    per_image: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        per_image[(r["group"], r["image"])].append(r)
    per_group: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (group, _), image_rows in per_image.items():
        for m in METRICS:
            per_group[group][m].append(float(np.mean([r[m] for r in image_rows])))
    groups = {g: {m: float(np.mean(v)) for m, v in ms.items()} for g, ms in sorted(per_group.items())}
    overall = {m: float(np.mean([gm[m] for gm in groups.values()])) for m in METRICS}
    by_subject: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for m in METRICS:
            by_subject[r["subject"]][m].append(r[m])
    return {
        "n_images": len(per_image), "n_entries": len({r["index"] for r in rows}), "n_groups": len(groups),
        "dino": {s: overall[f"dino_{s}"] for s in SETTINGS},
        "clip_i": {s: overall[f"clip_i_{s}"] for s in SETTINGS},
        "clip_t": overall["clip_t"],
        "per_group": groups,
        "per_subject": {s: {m: float(np.mean(v)) for m, v in ms.items()} for s, ms in sorted(by_subject.items())},
    }


BOXES_SUFFIX = ".boxes.json"


def subject_query(subject: str) -> str:
    """A DreamBench subject folder name as a detector query: ``rc_car`` -> ``rc car``, ``dog2`` -> ``dog``."""
    return subject.replace("_", " ").rstrip("0123456789").strip() or subject


def subject_regions(image_path: Path, k: int, size: tuple[int, int], image: np.ndarray | None = None,
                    detect: Callable[[np.ndarray, list[str]], tuple[np.ndarray, np.ndarray]] | None = None,
                    queries: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """bool ``[k, H, W]`` regions of the ``k`` subjects of a generated image, in the prompt's order, and where
    they came from: ``boxes`` (a sidecar ``<image stem>.boxes.json`` holding ``{"boxes": [[x0, y0, x1, y1], ...]}``
    in pixels, one per subject in prompt order: a generator's layout or a detector's output), ``detector`` (no
    sidecar, ``detect`` given: ``detect(image, queries)`` returns one pixel box per query, e.g.
    :meth:`focusdpo.data.mask_models.MaskModels.detect` of ``eval.confusion_detector``), ``strips`` (neither:
    ``k`` equal vertical strips, left to right in prompt order, the layout UNO-style prompts ask for) or
    ``strips, detector missed`` (the detector found no box above its score for some subject)."""
    w, h = size
    regions = np.zeros((k, h, w), dtype=bool)
    sidecar = image_path.with_name(image_path.stem + BOXES_SUFFIX)
    if sidecar.is_file():
        try:
            boxes = json.loads(sidecar.read_text())["boxes"]
            boxes = [[int(round(float(v))) for v in b] for b in boxes]
        except (ValueError, KeyError, TypeError) as e:
            raise DreamBenchError(f"{sidecar}: not a boxes file ({e}); expected {{\"boxes\": [[x0, y0, x1, y1], "
                                  f"...]}} with one box per subject in prompt order") from e
        if len(boxes) != k or any(len(b) != 4 for b in boxes):
            raise DreamBenchError(f"{sidecar}: {len(boxes)} boxes for a prompt of {k} subjects; give one "
                                  f"[x0, y0, x1, y1] per subject in prompt order")
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            x0, x1, y0, y1 = max(0, x0), min(w, x1), max(0, y0), min(h, y1)
            if x1 <= x0 or y1 <= y0:
                raise DreamBenchError(f"{sidecar}: box {i} {boxes[i]} is empty inside the {w}x{h} image")
            regions[i, y0:y1, x0:x1] = True
        return regions, "boxes"
    source = "strips"
    if detect is not None and image is not None:
        from focusdpo.data.mask_models import SubjectNotFound

        if queries is None or len(queries) != k:
            raise DreamBenchError(f"{image_path.name}: the detector needs one query per subject ({k}), got {queries}")
        try:
            boxes, _ = detect(image, list(queries))
        except SubjectNotFound:
            source = "strips, detector missed"
        else:
            for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=float)):
                c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
                c1, r1 = min(w, max(c0 + 1, int(np.ceil(x1)))), min(h, max(r0 + 1, int(np.ceil(y1))))
                regions[i, r0:r1, c0:c1] = True
            return regions, "detector"
    cuts = np.linspace(0, w, k + 1).round().astype(int)
    for i in range(k):
        regions[i, :, cuts[i]:cuts[i + 1]] = True
    return regions, source


def confusion_generated(generated: Sequence[Generated], embed: Callable[[Sequence[np.ndarray]], np.ndarray],
                        detect: Callable[[np.ndarray, list[str]], tuple[np.ndarray, np.ndarray]] | None = None
                        ) -> list[dict]:
    """The identity-confusion metric (issue 16 point 3) of every multi-subject image: its subject regions
    (:func:`subject_regions`; ``detect``: the detector for images without a boxes sidecar, queried with
    :func:`subject_query` of each subject) are cropped, embedded and assigned to the entry's fixed references by a
    Hungarian assignment (:func:`focusdpo.judges.assign_image`). One row per image: image, index, sample, group,
    regions (boxes | detector | strips | strips, detector missed), confused (0/1), margin (mean over regions of
    the best other reference's similarity minus the own one, :func:`focusdpo.judges.confusion_margin`),
    matched_sim, own_sim, assigned."""
    from focusdpo.judges import assign_image

    rows = []
    for g in generated:
        k = len(g.entry.subjects)
        if k < 2:
            continue
        image = np.asarray(_open(g.path).convert("RGB"))
        regions, source = subject_regions(g.path, k, (image.shape[1], image.shape[0]), image, detect,
                                          [subject_query(x) for x in g.entry.subjects])
        refs = [np.asarray(_open(r).convert("RGB")) for r in g.entry.references]
        a = assign_image(image, regions, refs, embed)
        rows.append({"image": g.path.name, "index": g.entry.index, "sample": g.sample,
                     "group": "+".join(g.entry.subjects), "regions": source, "confused": float(a["confused"]),
                     "margin": float(np.nanmean(a["margin"])),
                     "matched_sim": float(np.nanmean(a["matched"])), "own_sim": float(np.nanmean(a["own"])),
                     "assigned": " ".join(str(int(v)) for v in a["assigned"])})
    return rows


def summarize_confusion(rows: Sequence[dict]) -> dict:
    """Confusion rate, mean margin, matched and own similarity over the images, and how their regions were
    found."""
    return {"rate": float(np.mean([r["confused"] for r in rows])),
            "margin": float(np.mean([r["margin"] for r in rows])),
            "matched_sim": float(np.mean([r["matched_sim"] for r in rows])),
            "own_sim": float(np.mean([r["own_sim"] for r in rows])), "n_images": len(rows),
            "regions": {src: sum(r["regions"] == src for r in rows)
                        for src in ("boxes", "detector", "strips", "strips, detector missed")}}


def dino_embed(scorer: Scorer) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """The scorer's DINO as an embedder of uint8 ``[h, w, 3]`` arrays."""
    return lambda images: scorer.embed_dino([Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]).numpy()


def write_rows(rows: Sequence[dict], path: str | Path) -> None:
    """Write :func:`score_generated` rows as CSV (one line per image and subject)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def evaluate_dreambench(benchmark: str, images_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                        scorer: Scorer, method: str | None = None, allow_partial: bool = False,
                        detect: Callable[[np.ndarray, list[str]], tuple[np.ndarray, np.ndarray]] | None = None
                        ) -> dict:
    """Score ``images_dir`` on ``benchmark`` and write ``out_dir/{metrics.json, scores.csv, report.md}``.

    ``metrics.json`` is ``{method: summary}`` (see :func:`summarize`, plus "benchmark", and for multi-subject
    prompts "confusion": :func:`summarize_confusion`, per image in ``confusion.csv``); ``method`` defaults to
    the images folder's name. Returns that dict.
    """
    from focusdpo.eval.report import dreambench_markdown

    entries = load_entries(data_dir, benchmark)
    generated = index_generated(images_dir, entries, allow_partial=allow_partial)
    rows = score_generated(generated, data_dir, scorer)
    confusion = confusion_generated(generated, dino_embed(scorer), detect)
    method = method or Path(images_dir).resolve().name
    metrics = {method: {"benchmark": benchmark, "n_list_entries": len(entries), **summarize(rows)}}
    if confusion:
        metrics[method]["confusion"] = summarize_confusion(confusion)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_rows(rows, out / "scores.csv")
    if confusion:
        write_rows(confusion, out / "confusion.csv")
    (out / "report.md").write_text(dreambench_markdown(metrics))
    return metrics


def run_dreambench_command(cfg: Config, benchmark: str, images_dir: Path, data_dir: Path, out_dir: Path,
                           method: str | None, allow_partial: bool, device: str) -> str:
    """``focusdpo eval --benchmark dreambench-*``: load the scorers of ``cfg.eval``, score, return a summary line.

    The list and the images folder are checked before the (large) scorer models are loaded.
    """
    index_generated(images_dir, load_entries(data_dir, benchmark), allow_partial=allow_partial)
    detect = None
    if cfg.eval.confusion_detector and benchmark == "dreambench-multi":
        from focusdpo.data.mask_models import MaskModelsUnavailable, load_detector

        try:
            detect = load_detector(cfg.eval.confusion_detector, device, cfg.eval.confusion_min_score).detect
        except MaskModelsUnavailable as e:
            raise DreamBenchError(str(e)) from e
    scorer = load_scorer(cfg.eval.dino_model, cfg.eval.clip_model, device, cfg.eval.batch_size)
    metrics = evaluate_dreambench(benchmark, images_dir, data_dir, out_dir, scorer, method, allow_partial, detect)
    name, m = next(iter(metrics.items()))
    conf = m.get("confusion")
    extra = (f", identity confusion {conf['rate']:.3f} (matched DINO {conf['matched_sim']:.4f})"
             if conf else "")
    return (f"{name} on {benchmark} ({m['n_images']} images): DINO {m['dino']['original']:.4f} / "
            f"{m['dino']['kosmos']:.4f}, CLIP-I {m['clip_i']['original']:.4f} / {m['clip_i']['kosmos']:.4f} "
            f"(original / kosmos), CLIP-T {m['clip_t']:.4f}{extra}; wrote {Path(out_dir) / 'metrics.json'}")
