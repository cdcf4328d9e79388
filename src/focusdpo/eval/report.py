"""Reports: markdown tables of ``metrics.json`` and PNG comparison grids (references | base | post-trained)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# Toy metrics in report order, with the direction that is better.
TOY_METRICS = (("fidelity", "higher"), ("leakage", "lower"), ("prompt", "higher"))


def fmt(value: Mapping | float | None, digits: int = 3, signed: bool = False) -> str:
    """``{"mean": m, "std": s}`` -> ``"m ± s"``, with ``" [lo, hi]"`` when it has a ``ci``; a number -> its value;
    None -> ``"-"``. ``signed``: a leading + on positive means (differences)."""
    if value is None:
        return "-"
    sign = "+" if signed else ""
    if isinstance(value, Mapping):
        text = f"{value['mean']:{sign}.{digits}f}"
        if "std" in value:
            text += f" ± {value['std']:.{digits}f}"
        return text + fmt_ci(value.get("ci"), digits)
    return f"{float(value):{sign}.{digits}f}"


def fmt_paired(diff: Mapping | None, digits: int = 3) -> str:
    """A paired difference ``{"mean", "ci", "excludes_zero"}`` -> its signed mean, in bold when the interval
    excludes 0, and the interval; None -> ``"-"``."""
    if diff is None or diff.get("mean") is None:
        return "-"
    bold = "**" if diff.get("excludes_zero") else ""
    return f"{bold}{diff['mean']:+.{digits}f}{bold}" + fmt_ci(diff.get("ci"), digits)


def fmt_ci(ci: Sequence[float | None] | None, digits: int = 3) -> str:
    """``[lo, hi]`` -> ``" [lo, hi]"`` (leading space); None or missing ends -> ``""``."""
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def difference_lines(rows: Mapping[str, Mapping], target: float, refs: Sequence[str] = ("base", "dpo"),
                     lower_is_better: Sequence[str] = ("leakage",)) -> list[str]:
    """Sentences on every paired difference with an interval, the detectable effects, then power warnings.

    rows: method -> ``{"vs_<ref>": {metric: {"mean", "ci", "excludes_zero", "mde", "n_units"}}}`` (the toy
    ``metrics.json`` or ``results.json``). A difference is called only when its interval excludes 0
    ("dpo lowers leakage vs base by -0.012 [-0.020, -0.004]: interval excludes 0"); otherwise "no detectable
    difference". Then the largest detectable effect of each metric, and a warning for each one above ``target``.
    """
    lines = []
    for m, row in rows.items():
        for ref in refs:
            seen, unseen = [], []
            for h, d in row.get(f"vs_{ref}", {}).items():
                if d.get("ci") is None or d["ci"][0] is None:
                    continue
                span = f"{d['mean']:+.3f}{fmt_ci(d['ci'])}"
                if d["excludes_zero"]:
                    good = (d["mean"] < 0) == (h in lower_is_better)
                    seen.append(f"{'raises' if d['mean'] > 0 else 'lowers'} {h} by {span}: interval excludes 0 "
                                f"({'better' if good else 'worse'})")
                else:
                    mde = "?" if d.get("mde") is None else f"{d['mde']:.3f}"
                    unseen.append(f"{h} {span}, detectable effect {mde}")
            if seen or unseen:
                lines.append(f"{m} vs {ref}: " + "; ".join(seen + ([f"no detectable difference in "
                                                                    f"{'; '.join(unseen)}"] if unseen else [])))
    worst = detectable_effects(rows, refs)
    if worst:
        lines.append("detectable paired difference (80 % power, alpha 0.05, largest over the comparisons): "
                     + ", ".join(f"{h} {mde:.3f}" for h, (mde, _) in worst.items())
                     + f" with {max(n for _, n in worst.values())} units")
    for h, (mde, n) in worst.items():
        if mde > target:
            lines.append(f"warning: this evaluation cannot detect a {h} difference of {target:g}: detectable effect "
                         f"{mde:.3f} with {n} units; about {math.ceil(n * (mde / target) ** 2)} units are needed")
    return lines


def detectable_effects(rows: Mapping[str, Mapping], refs: Sequence[str] = ("base", "dpo")
                       ) -> dict[str, tuple[float, int]]:
    """Per metric, the largest ``mde`` over every ``vs_<ref>`` difference of ``rows`` and its ``n_units``."""
    worst: dict[str, tuple[float, int]] = {}
    for row in rows.values():
        for ref in refs:
            for h, d in row.get(f"vs_{ref}", {}).items():
                if d.get("mde") is not None and d["mde"] > worst.get(h, (-1.0, 0))[0]:
                    worst[h] = (d["mde"], int(d.get("n_units", 0)))
    return worst


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


def toy_markdown(metrics: Mapping[str, Mapping], base: str = "base", target: float | None = None) -> str:
    """The toy report: overall table, one table per subject count, paired gaps to ``base`` when it is present,
    and (``target`` given) the sentences of :func:`difference_lines` with its power warnings.

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
                rows.append([m] + [fmt({**paired_difference(v[n]["per_seed"], metrics[base][n]["per_seed"]),
                                        "ci": v.get(f"vs_{base}", {}).get(n, {}).get("ci")})
                                   for n in names])
        out += [f"\n## Paired difference to `{base}` (same scenes and noise; mean ± std over seeds "
                "[95 % paired bootstrap interval over units])\n",
                table(["method"] + [f"Δ {n}" for n in names], rows)]
    if any("ci" in v.get(n, {}) for v in metrics.values() for n in names):
        out.append(INTERVALS_NOTE)
    if target is not None:
        lines = difference_lines(metrics, target)
        if lines:
            out += ["\n## What the sample can see\n\n"] + [f"- {line}\n" for line in lines]
    return "".join(out)


INTERVALS_NOTE = ("\nIntervals: 95 % paired bootstrap over the evaluation units (subject count x scene x sampling "
                  "seed x sample, shared by every method; training seeds too where there are several); a "
                  "difference counts only when its interval excludes 0. Detectable effect: 2.80 x the SE of "
                  "the paired difference from its per-unit variance (80 % power, two-sided alpha 0.05).\n")


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
    conf = [[m, fmt(v["confusion"]["rate"]), fmt(v["confusion"].get("margin")), fmt(v["confusion"]["matched_sim"]),
             fmt(v["confusion"]["own_sim"]),
             str(v["confusion"]["n_images"]), ", ".join(f"{k} {n}" for k, n in v["confusion"]["regions"].items() if n)]
            for m, v in metrics.items() if v.get("confusion")]
    if conf:
        out += ["\n## Identity confusion\n\nEach subject region (a `<image>.boxes.json` sidecar in prompt order, else "
                "the box of `eval.confusion_detector` for the subject's name when one is configured, else "
                "equal vertical strips) is cropped, embedded with DINO and assigned to the fixed references by a "
                "Hungarian assignment; confused = the assignment disagrees with the prompt's order; margin = the best "
                "other reference's DINO similarity minus the own one, mean over regions (higher = more like "
                "another subject).\n\n",
                table(["method", "confusion rate", "margin", "matched DINO", "own DINO", "images", "regions"], conf)]
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
