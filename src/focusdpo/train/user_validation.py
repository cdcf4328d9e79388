"""The user's own validation prompts (``train.validation``): sampled with the LoRA during training.

Each entry is a prompt, its reference image files (one per subject, in order of mention) and an optional seed.
:func:`check_validation` reads every file before training starts (a :class:`~focusdpo.config.ConfigError`
naming ``train.validation[i].references[j]`` when one is missing or not an image), and
:func:`check_prompts` encodes every prompt once the backbone is loaded. :func:`write_validation`
samples each prompt with the current LoRA (:func:`focusdpo.sampling.generate`, ``sample.*`` settings, the
entry's seed or ``sample.seed``) at the training records' target size, the references resized to the records'
reference size, and writes one PNG (a row per prompt: references | sample, :func:`focusdpo.sampling.sample_grid`)
to ``<run>/validation/step-N.png``; the trainer also sends it to the tracker as ``validation/samples``. The
trainer calls it every ``train.checkpoint_every`` steps and at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from focusdpo.config import Config, ConfigError


def _read(path: str, name: str) -> torch.Tensor:
    from focusdpo.sampling import read_image

    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{name}={path!r} is invalid: no such file (relative paths are read from "
                          f"{Path.cwd()}); allowed an existing PNG or JPEG file")
    try:
        return read_image(str(Path(path).expanduser()))
    except ValueError as e:
        raise ConfigError(f"{name}={path!r} is invalid: {e}") from None


def check_validation(cfg: Config) -> None:
    """Every reference file of ``train.validation`` exists and decodes as an image (:class:`ConfigError` if not)."""
    for i, item in enumerate(cfg.train.validation):
        for j, path in enumerate(item.references):
            _read(path, f"train.validation[{i}].references[{j}]")


def check_prompts(backbone: Any, cfg: Config) -> None:
    """Every ``train.validation`` prompt encodes with ``backbone`` (e.g. flux-tiny's word vocabulary), so a bad
    prompt fails before the first step rather than at the first checkpoint."""
    for i, item in enumerate(cfg.train.validation):
        try:
            backbone.encode_prompts([item.prompt])
        except ValueError as e:
            raise ConfigError(f"train.validation[{i}].prompt={item.prompt!r} is invalid: {e}") from None


def load_references(cfg: Config, ref_size: tuple[int, int]) -> list[list[torch.Tensor]]:
    """Per entry, its references as ``float [1, 3, h, w]`` in ``[0, 1]`` resized to ``ref_size`` ``(h, w)``."""
    out = []
    for i, item in enumerate(cfg.train.validation):
        refs = [_read(p, f"train.validation[{i}].references[{j}]") for j, p in enumerate(item.references)]
        out.append([torch.nn.functional.interpolate(r, size=ref_size, mode="bicubic", antialias=True,
                                                    align_corners=False).clamp(0, 1) for r in refs])
    return out


def _stack_rows(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """uint8 ``[H_i, W_i, 3]`` rows stacked top to bottom on a white canvas (rows differ in width with K)."""
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + pad * (len(rows) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        canvas[y:y + r.shape[0], :r.shape[1]] = r
        y += r.shape[0] + pad
    return canvas


def write_validation(backbone: Any, cfg: Config, references: list[list[torch.Tensor]], size: tuple[int, int],
                     path: Path, autocast: Any) -> np.ndarray:
    """Sample every entry of ``train.validation`` at ``size`` ``(H, W)`` and write the grid PNG to ``path``;
    returns the grid (uint8 ``[H, W, 3]``)."""
    from PIL import Image

    from focusdpo.sampling import generate, sample_grid

    rows = []
    net = backbone.trainable()
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), autocast():
            for item, refs in zip(cfg.train.validation, references, strict=True):
                refs = [r.to(backbone.device) for r in refs]
                image = generate(backbone, [item.prompt], refs, size, cfg.sample, seed=item.seed)
                rows.append(sample_grid([r.cpu() for r in refs], [image.float().cpu()]))
    finally:
        net.train(was_training)
    grid = _stack_rows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid
