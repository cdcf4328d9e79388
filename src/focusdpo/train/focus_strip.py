"""Focus-map strips (issue 8 point 2): where the method looks, across noise timesteps.

For one DIP record and a (post-trained) backbone, the positive is noised to several ``s`` with one fixed
noise draw, the policy runs once per ``s`` with the focus tap, and the adaptive focus of
:func:`focusdpo.train.step.compute_focus` (the very code the training step uses) gives, per timestep:

- ``M'``: the SPAF top-k tokens each subject claims (one colour per subject),
- ``M_s``: confused or unmatched subject tokens, ``A``: aligned tokens (for the record; drawn with ``M_s``),
- ``M_d``: the stored DPCE map kept inside ``union_k P_k`` (the detail term before gating),
- the gate ``g`` (``a >= tau``) as a filled tile with ``a`` printed on it,
- ``W``: the final token weights (mean 1).

Rows are the maps, columns the timesteps (noisiest left); a first column shows the positive, the regions
``P_k`` and ``M_prior``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from focusdpo.backbones.base import Backbone
from focusdpo.backbones.diffusion import diffusion_of
from focusdpo.config import Config
from focusdpo.train.step import compute_focus, encode_batch, reference_complexity, token_masks

DEFAULT_SIGMAS = (0.9, 0.7, 0.5, 0.3, 0.1)
_ROWS = ("M' (claimed)", "M_s (red) / A (green)", "M_d in P", "gate g", "W")
_SUBJECT_COLOURS = np.array([[0.90, 0.10, 0.10], [0.10, 0.45, 0.95], [0.10, 0.75, 0.20], [0.95, 0.70, 0.05],
                             [0.60, 0.20, 0.80]])


def focus_maps(backbone: Backbone, batch: Mapping[str, Any], cfg: Config, sigmas: Sequence[float] = DEFAULT_SIGMAS,
               seed: int = 0) -> list[dict[str, Any]]:
    """The focus of the first record of ``batch`` at each ``s`` in ``sigmas`` (adapters as they are).

    Returns one dict per sigma with ``sigma``, ``claimed`` ``long [h, w]`` (subject index + 1, 0 = none),
    ``confused``/``aligned`` ``bool [h, w]``, ``m_d`` ``[h, w]`` in [0, 1] (inside the subject union),
    ``gate`` and ``a`` (floats) and ``W`` ``[h, w]`` (mean 1), all on the CPU.
    """
    one = _first(batch)
    inputs = encode_batch(backbone, one)
    x0 = inputs.x0_w
    h, w = inputs.grid
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device, x0.dtype)
    masks = token_masks(one, backbone.patch, [r.grid for r in inputs.refs], x0.device)
    out = []
    for sigma in sigmas:
        if not 0.0 < float(sigma) <= 1.0:
            raise ValueError(f"sigma={sigma!r} is invalid: timesteps must be in (0, 1]")
        s = torch.full((1,), float(sigma), device=x0.device)
        x_t, _ = diffusion_of(backbone).noisy(x0, eps, s)
        with torch.no_grad():
            _, tap = backbone.predict(x_t, s, inputs.text, inputs.refs, inputs.grid, tap=True, ref_masks=masks[2])
        ref_c = None
        if cfg.focus.ref_complexity_scale > 0:
            ref_c = reference_complexity(one["references"], masks[2], backbone.patch, cfg.focus)
        focus = compute_focus(tap, masks, cfg.focus, ref_c)
        claimed = (focus.matches[0].long() * torch.arange(1, focus.matches.shape[1] + 1,
                                                          device=x0.device)[:, None]).sum(0)
        union = focus.sets["union"][0]
        out.append({
            "sigma": float(sigma), "claimed": claimed.reshape(h, w).cpu(),
            "confused": focus.sets["confused"][0].reshape(h, w).cpu(),
            "aligned": focus.sets["aligned"][0].reshape(h, w).cpu(),
            "m_d": (focus.m_d[0] * union).reshape(h, w).cpu(),
            "gate": float(focus.stats["gate"][0]), "a": float(focus.stats["a"][0]),
            "W": focus.W[0].reshape(h, w).float().cpu(),
        })
    return out


def _first(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The first record of a collated batch, as a batch of one."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[:1]
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out[key] = [v[:1] for v in value]
        elif isinstance(value, list):
            out[key] = value[:1]
        else:
            out[key] = value
    return out


def render_strip(maps: Sequence[Mapping[str, Any]], positive: torch.Tensor, regions: torch.Tensor,
                 m_prior: torch.Tensor, title: str = "") -> np.ndarray:
    """Draw :func:`focus_maps` output as a PNG-ready ``uint8 [H', W', 3]`` image (matplotlib, Agg).

    positive: ``[3, H, W]`` in [0, 1]; regions: ``[K, H, W]`` in {0, 1}; m_prior: ``[H, W]`` in {0, 1}.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = len(maps) + 1
    fig, axes = plt.subplots(len(_ROWS), cols, figsize=(1.6 * cols, 1.6 * len(_ROWS)), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    _input_column(axes[:, 0], positive, regions, m_prior)
    w_max = max(float(m["W"].max()) for m in maps)
    for j, m in enumerate(maps, start=1):
        axes[0, j].set_title(f"s={m['sigma']:.2f}", fontsize=8)
        axes[0, j].imshow(_colour_claims(m["claimed"]), interpolation="nearest")
        sets = np.zeros((*m["confused"].shape, 3))
        sets[m["confused"].numpy()] = (0.9, 0.1, 0.1)
        sets[m["aligned"].numpy()] = (0.1, 0.75, 0.2)
        axes[1, j].imshow(sets, interpolation="nearest")
        axes[2, j].imshow(m["m_d"].numpy(), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        axes[3, j].imshow(np.full((2, 2), m["gate"]), vmin=0, vmax=1, cmap="RdYlGn")
        axes[3, j].text(0.5, 0.5, f"a={m['a']:.2f}\ng={int(m['gate'])}", ha="center", va="center", fontsize=8)
        axes[4, j].imshow(m["W"].numpy(), vmin=0, vmax=w_max, cmap="viridis", interpolation="nearest")
    for i, name in enumerate(_ROWS):
        axes[i, 1].set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _input_column(axes: Sequence[Any], positive: torch.Tensor, regions: torch.Tensor, m_prior: torch.Tensor
                  ) -> None:
    axes[0].imshow(positive.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    axes[0].set_title("positive", fontsize=8)
    owner = (regions.cpu() > 0.5).long() * torch.arange(1, regions.shape[0] + 1)[:, None, None]
    axes[1].imshow(_colour_claims(owner.amax(0)), interpolation="nearest")
    axes[1].set_xlabel("P_k", fontsize=7)
    axes[2].imshow(m_prior.cpu().numpy(), vmin=0, vmax=1, cmap="gray", interpolation="nearest")
    axes[2].set_xlabel("M_prior", fontsize=7)
    for ax in axes[3:]:
        ax.axis("off")


def _colour_claims(claimed: torch.Tensor) -> np.ndarray:
    """``long [h, w]`` subject index + 1 (0 = none) -> RGB float ``[h, w, 3]`` (black background)."""
    palette = np.concatenate([np.zeros((1, 3)), _SUBJECT_COLOURS])
    return palette[claimed.numpy().clip(0, len(palette) - 1)]


def focus_strip(backbone: Backbone, batch: Mapping[str, Any], cfg: Config, out_path: str | Path | None = None,
                sigmas: Sequence[float] = DEFAULT_SIGMAS, seed: int = 0) -> np.ndarray:
    """Focus maps of the first record of ``batch`` rendered as a strip; written to ``out_path`` when given.

    Returns the strip as ``uint8 [H', W', 3]``.
    """
    maps = focus_maps(backbone, batch, cfg, sigmas, seed)
    title = f"{batch['id'][0]}: {batch['prompt'][0]}"
    image = render_strip(maps, batch["positive"][0], batch["regions"][0], batch["m_prior"][0], title)
    if out_path is not None:
        from PIL import Image

        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out_path)
    return image


def load_run_backbone(cfg: Config, run_dir: str | Path | None, device: torch.device | str = "cpu") -> Backbone:
    """The backbone with the run's LoRA (``lora.safetensors``, else its newest checkpoint's) and ``cfg``'s tap
    layer; ``run_dir`` None: the base model of ``cfg.model`` (no adapters)."""
    from focusdpo.runs import load_method

    backbone = load_method(cfg, run_dir, device, check_world=False, allow_checkpoint=True)
    backbone.tap_layer = cfg.focus.tap_layer
    return backbone


def record_batch(cfg: Config, record: str) -> dict[str, Any]:
    """The DIP record ``record`` (an id, or an index) of the run's data set as a collated batch of one."""
    from focusdpo.data import ensure_toy_dip
    from focusdpo.data.dataset import DipDataset, collate_dip

    dataset = DipDataset(ensure_toy_dip(cfg))
    if record in dataset.ids:
        index = dataset.ids.index(record)
    elif record.isdigit() and int(record) < len(dataset):
        index = int(record)
    else:
        raise ValueError(f"--record {record!r} is neither a record id nor an index below {len(dataset)} of the "
                         f"DIP set (ids look like {dataset.ids[0]!r})")
    return collate_dip([dataset[index]])


def focus_map_command(cfg: Config, run_dir: str | Path | None, record: str, out: str | Path,
                      sigmas: Sequence[float] = DEFAULT_SIGMAS, seed: int = 0, device: str = "cpu") -> Path:
    """``focusdpo focus-map``: the strip of one record under a run's LoRA, written to ``out`` (PNG)."""
    backbone = load_run_backbone(cfg, run_dir, device)
    backbone.trainable().eval()
    focus_strip(backbone, record_batch(cfg, record), cfg, out, sigmas, seed)
    return Path(out)
