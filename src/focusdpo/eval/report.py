"""Reports: markdown tables of ``metrics.json`` and PNG comparison grids (references | base | post-trained)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# Toy metrics in report order, with the direction that is better.
TOY_METRICS = (("fidelity", "higher"), ("leakage", "lower"), ("prompt", "higher"))


def fmt(value: Mapping | float | None, digits: int = 3) -> str:
    """``{"mean": m, "std": s}`` -> ``"m ± s"``; a number -> its value; None -> ``"-"``."""
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return f"{value['mean']:.{digits}f} ± {value.get('std', 0.0):.{digits}f}"
    return f"{float(value):.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def paired_difference(per_seed: Sequence[float], base_per_seed: Sequence[float]) -> dict[str, float]:
    """Mean and std (over seeds, ddof 0) of ``per_seed[i] - base_per_seed[i]``: the paired method-minus-base gap."""
    if len(per_seed) != len(base_per_seed):
        raise ValueError(f"paired difference needs the same seeds: {len(per_seed)} vs {len(base_per_seed)} values")
    d = np.asarray(per_seed, dtype=float) - np.asarray(base_per_seed, dtype=float)
    return {"mean": float(d.mean()), "std": float(d.std())}


def toy_markdown(metrics: Mapping[str, Mapping], base: str = "base") -> str:
    """The toy report: overall table, one table per subject count, paired gaps to ``base`` when it is present.

    ``metrics``: the toy ``metrics.json`` (see :func:`focusdpo.eval.toy.evaluate_toy`).
    """
    names = [m for m, _ in TOY_METRICS]
    header = ["method"] + [f"{m} ({'↑' if d == 'higher' else '↓'})" for m, d in TOY_METRICS]
    first = next(iter(metrics.values()))
    out = ["# Toy benchmark\n",
           f"Held-out identities; {first.get('n_scenes', '?')} scenes per subject count; seeds {first.get('seeds')}; "
           f"{first.get('samples_per_prompt', 1)} sample(s) per prompt and seed. Mean ± std over seeds.\n",
           table(header, [[m] + [fmt(v.get(n)) for n in names] for m, v in metrics.items()])]
    counts = sorted({k for v in metrics.values() for k in v.get("by_subjects", {})}, key=int)
    for k in counts:
        rows = [[m] + [fmt(v["by_subjects"][k].get(n)) for n in names]
                for m, v in metrics.items() if k in v.get("by_subjects", {})]
        out += [f"\n## {k} subjects\n", table(header, rows)]
    if base in metrics and len(metrics) > 1:
        rows = []
        for m, v in metrics.items():
            if m != base:
                rows.append([m] + [fmt(paired_difference(v[n]["per_seed"], metrics[base][n]["per_seed"]))
                                   for n in names])
        out += [f"\n## Paired difference to `{base}` (same scenes and noise; mean ± std over seeds)\n",
                table(["method"] + [f"Δ {n}" for n in names], rows)]
    return "".join(out)


def dreambench_markdown(metrics: Mapping[str, Mapping]) -> str:
    """The DreamBench report: one overall row per method, then per-group and per-subject tables of each method."""
    header = ["method", "benchmark", "images", "DINO original", "DINO kosmos", "CLIP-I original", "CLIP-I kosmos",
              "CLIP-T"]
    rows = [[m, v["benchmark"], str(v["n_images"]), fmt(v["dino"]["original"]), fmt(v["dino"]["kosmos"]),
             fmt(v["clip_i"]["original"]), fmt(v["clip_i"]["kosmos"]), fmt(v["clip_t"])] for m, v in metrics.items()]
    out = ["# DreamBench\n",
           "DINO ViT-S/16 CLS and CLIP ViT-B/32 cosines. `original`: every photo of the subject as reference; "
           "`kosmos`: the one photo the UNO list names. Image -> reference group -> mean over groups.\n",
           table(header, rows)]
    cols = ["dino_original", "dino_kosmos", "clip_i_original", "clip_i_kosmos", "clip_t"]
    for m, v in metrics.items():
        for key, title in (("per_group", "group"), ("per_subject", "subject")):
            if v.get(key) and (key == "per_subject" or v["benchmark"] == "dreambench-multi"):
                rows = [[g] + [fmt(s[c]) for c in cols] for g, s in v[key].items()]
                out += [f"\n## {m}: per {title}\n", table([title] + cols, rows)]
    return "".join(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``float [B, 3, H, W]`` in [0, 1] -> ``uint8 [B, H, W, 3]``."""
    return (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def labelled_grid(grid: np.ndarray, labels: Sequence[tuple[int, str]], scale: int = 4,
                  header: int = 14) -> Image.Image:
    """Upscale ``grid`` (uint8 [H, W, 3]) by ``scale`` (nearest) and add a header row of text labels.

    ``labels``: (x in unscaled pixels, text) for each column title.
    """
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
        raise ValueError(f"grid must be uint8 [H, W, 3], got {grid.dtype} {grid.shape}")
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (img.width, img.height + header), "white")
    canvas.paste(img, (0, header))
    draw = ImageDraw.Draw(canvas)
    for x, text in labels:
        draw.text((x * scale + 2, 1), text, fill="black")
    return canvas


def comparison_grid(references: Sequence[torch.Tensor], columns: Mapping[str, torch.Tensor], out_png: str | Path,
                    scale: int = 4, pad: int = 2) -> Image.Image:
    """Save one row per scene: its K references, then one column per method (references | base | post-trained).

    references: K tensors ``float [B, 3, h_k, w_k]``; columns: method -> ``float [B, 3, H, W]``; all in [0, 1].
    """
    from focusdpo.sampling import sample_grid

    grid = sample_grid(list(references), list(columns.values()), pad=pad)
    widths = [r.shape[3] for r in references] + [c.shape[3] for c in columns.values()]
    starts = np.cumsum([pad] + [w + pad for w in widths])[:-1]
    labels = [(int(starts[0]), "refs")] + [(int(x), m) for x, m in zip(starts[len(references):], columns,
                                                                       strict=True)]
    img = labelled_grid(grid, labels, scale=scale)
    img.save(out_png)
    return img
