"""``focusdpo generate --benchmark dreambench-single|dreambench-multi``: the folder of images that
``focusdpo eval`` scores, from the base model or a trained run.

Protocol (UNO's ``inference.py --eval_json_path``): every entry of the UNO list, ``eval.dreambench_images``
images per prompt with seeds ``eval.dreambench_seed + j``, square ``eval.dreambench_size`` outputs, references
resized so their longer side is ``eval.dreambench_ref_size`` (default 512 for one subject, 320 for several)
and center-cropped to multiples of 16 pixels (one FLUX token). Sampler steps and guidance come from
``cfg.sample`` (UNO: 25 steps, guidance 4). Files are named as :func:`focusdpo.eval.dreambench.image_name`
says; existing files are kept, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from focusdpo.config import Config
from focusdpo.eval.dreambench import image_name
from focusdpo.eval.dreambench_data import load_entries
from focusdpo.eval.methods import load_method

REF_MULTIPLE = 16


def load_reference(path: str | Path, long_side: int, multiple: int = REF_MULTIPLE) -> torch.Tensor:
    """A reference photo -> ``float [1, 3, h, w]`` in [0, 1]: longer side ``long_side`` (bicubic, aspect kept),
    then center-cropped so ``h`` and ``w`` are multiples of ``multiple``."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    w, h = image.size
    scale = long_side / max(w, h)
    nw, nh = max(multiple, round(w * scale)), max(multiple, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    cw, ch = nw - nw % multiple, nh - nh % multiple
    left, top = (nw - cw) // 2, (nh - ch) // 2
    image = image.crop((left, top, left + cw, top + ch))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """``float [3, H, W]`` in [0, 1] -> an 8-bit PNG, written atomically (temp file + rename)."""
    arr = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)


def generate_dreambench(cfg: Config, benchmark: str, data_dir: str | Path, out_dir: str | Path,
                        run_dir: str | Path | None = None, device: str | torch.device | None = None,
                        limit: int | None = None, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Generate the DreamBench images of ``benchmark`` into ``out_dir``; returns the paths of all its images.

    ``run_dir`` None: the base model of ``cfg.model``; else the run's model and final LoRA. ``limit``: only the
    first ``limit`` entries (a smoke test; ``eval --allow-partial`` scores such a folder).
    """
    from focusdpo.sampling import generate

    entries = load_entries(data_dir, benchmark)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit {limit} is invalid: allowed >= 1")
        entries = entries[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_method(cfg, run_dir, device, check_world=False)
    ev = cfg.eval
    size = (ev.dreambench_size, ev.dreambench_size)
    paths = []
    for entry in entries:
        ref_size = ev.dreambench_ref_size or (512 if len(entry.subjects) == 1 else 320)
        refs = None
        for j in range(ev.dreambench_images):
            seed = ev.dreambench_seed + j
            path = out / image_name(entry, seed)
            paths.append(path)
            if path.exists():
                continue
            if refs is None:
                refs = [load_reference(r, ref_size).to(backbone.device) for r in entry.references]
            image = generate(backbone, [entry.prompt], refs, size, cfg.sample, seed=seed)
            save_png(image[0], path)
            if progress:
                progress(f"{path.name}")
    (out / "generate.json").write_text(json.dumps(
        {"benchmark": benchmark, "run": None if run_dir is None else str(run_dir), "entries": len(entries),
         "images": len(paths), "config": cfg.to_dict()}, indent=2))
    return paths
