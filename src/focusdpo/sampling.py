"""The sampler loop and the batched ``generate`` that eval and the demo call.

``sample`` is the pure loop (k-diffusion style): ``model_fn(x, t, **cond) -> prediction``, integrated over a
schedule with the backbone's update (:mod:`focusdpo.backbones.diffusion`). With FLUX's flow matching (every
built-in backbone): ``x_t = (1 - s) x_0 + s eps`` and velocity ``eps - x_0``, Euler from ``s = 1`` (noise) to
``s = 0``; the schedule is uniform in ``s``, then shifted towards noise by ``mu`` that grows linearly with the
number of image tokens (0.5 at 256 tokens, 1.15 at 4096): ``s' = e^mu / (e^mu + 1/s - 1)``. ``shift_mu``,
``time_shift``, ``draw_noise`` and ``flux_sigmas`` are that convention's functions, kept importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from focusdpo.backbones.base import Backbone, TextCond, Tokens
from focusdpo.backbones.diffusion import FLOW, Diffusion, diffusion_of, noise_from_seed, shift_mu, time_shift
from focusdpo.config import LossConfig, SampleConfig

__all__ = ["backbone_model_fn", "doubled_guidance_fn", "draw_noise", "flux_sigmas", "generate", "initial_noise",
           "sample", "sample_grid", "shift_mu", "time_shift"]

ModelFn = Callable[..., torch.Tensor]


def draw_noise(generator: torch.Generator, n_pairs: int, shape: tuple[int, int], n_tokens: int,
               cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching training noise and timesteps of ``n_pairs`` pairs (:meth:`FlowMatching.draw`).

    shape: ``(N, C)`` tokens per image. Returns ``eps`` ``[n_pairs, N, C]`` standard normal and ``s``
    ``[n_pairs]`` in ``(0, 1)``: logit-normal(``cfg.logit_mean``, ``cfg.logit_std``), FLUX-shifted when
    ``cfg.time_shift``. One value per pair: the positive and the negative share them.
    """
    return FLOW.draw(generator, n_pairs, shape, n_tokens, cfg)


def flux_sigmas(steps: int, n_tokens: int, shift: bool = True) -> torch.Tensor:
    """FLUX.1's sampling schedule, ``float [steps + 1]`` decreasing from 1 to 0 (the last entry is exactly 0)."""
    return FLOW.sampling_sigmas(steps, n_tokens, shift)


def sample(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, Any],
           callback: Callable[[int, torch.Tensor, torch.Tensor, float], None] | None = None,
           diffusion: Diffusion = FLOW) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with ``diffusion.step`` (flow matching: Euler on
    ``dx/ds = v``).

    x: ``[B, ...]`` noise at ``sigmas[0]``; ``model_fn(x, t [B], **cond)`` returns the prediction, same shape as x.
    ``callback(i, x, v, sigma)`` sees each step's state before the update. Returns x at ``sigmas[-1]``.
    """
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        v = model_fn(x, t, **cond)
        if callback is not None:
            callback(i, x, v, s)
        x = diffusion.step(x, v, s, s_next)
    return x


def backbone_model_fn(backbone: Backbone, guidance: float = 1.0) -> ModelFn:
    """Wrap a backbone as ``model_fn(x, t, text, refs, grid, uncond=None)``; classifier-free guidance when
    ``guidance != 1`` and ``uncond`` (the empty prompt's :class:`TextCond`) is given: ``u + g (c - u)``."""
    def model_fn(x: torch.Tensor, t: torch.Tensor, text: TextCond, refs: Sequence[Tokens], grid: tuple[int, int],
                 uncond: TextCond | None = None) -> torch.Tensor:
        if guidance == 1.0 or uncond is None:
            return backbone.predict(x, t, text, refs, grid)[0]
        both_refs = [Tokens(torch.cat([r.tokens, r.tokens]), r.grid) for r in refs]
        pred = backbone.predict(torch.cat([x, x]), torch.cat([t, t]), TextCond.cat([text, uncond]), both_refs,
                                grid)[0]
        cond_v, uncond_v = pred.chunk(2)
        return uncond_v + guidance * (cond_v - uncond_v)
    return model_fn


def doubled_guidance_fn(backbone: Backbone, guidance: float) -> ModelFn:
    """Classifier-free guidance over conditioning built once per batch: ``model_fn(x, t, text, refs, grid)`` where
    ``text`` and ``refs`` hold the B prompt rows then the B empty-prompt rows (``[2B, ...]``), so a step only
    concatenates ``x`` and ``t``; returns ``u + g (c - u)`` like :func:`backbone_model_fn` with ``uncond``."""
    def model_fn(x: torch.Tensor, t: torch.Tensor, text: TextCond, refs: Sequence[Tokens], grid: tuple[int, int]
                 ) -> torch.Tensor:
        cond_v, uncond_v = backbone.predict(torch.cat([x, x]), torch.cat([t, t]), text, refs, grid)[0].chunk(2)
        return uncond_v + guidance * (cond_v - uncond_v)
    return model_fn


def initial_noise(shape: Sequence[int], seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed`` (the same numbers on every device)."""
    return noise_from_seed(shape, seed, device)


@torch.no_grad()
def generate(backbone: Backbone, prompts: Sequence[str], references: Sequence[torch.Tensor], size: tuple[int, int],
             cfg: SampleConfig, seed: int | None = None,
             callback: Callable[[int, torch.Tensor, torch.Tensor, float], None] | None = None) -> torch.Tensor:
    """Sample one image per prompt.

    references: K tensors ``float [B, 3, h_k, w_k]`` in ``[0, 1]`` (reference order = order of mention; K = 0
    for a backbone with its own sampling convention); size: ``(H, W)`` pixels. ``seed`` (default ``cfg.seed``)
    fixes the noise: same inputs, same images. The initial noise, the schedule and the update are the backbone's
    diffusion convention (``backbone.diffusion``, :mod:`focusdpo.backbones.diffusion`; FLUX.2 brings its
    pipeline's, so the same seed gives the stock pipeline's image). Returns ``float [B, 3, H, W]`` in ``[0, 1]``.
    """
    b = len(prompts)
    diffusion = diffusion_of(backbone)
    text_only = getattr(backbone, "text_to_image", False)  # FLUX.2 may take K = 0, as its stock pipeline does
    if (not references and not text_only) or any(r.shape[0] != b or r.ndim != 4 for r in references):
        raise ValueError(f"generate: references must be K >= 1 tensors [B={b}, 3, h, w], got "
                         f"{[tuple(r.shape) for r in references]}")
    grid = backbone.token_grid(size)
    refs = [backbone.encode_images(r) for r in references]
    text = backbone.encode_prompts(prompts)
    uncond = backbone.encode_prompts([""] * b) if cfg.guidance != 1.0 else None
    n, seed = grid[0] * grid[1], cfg.seed if seed is None else seed
    channels = refs[0].tokens.shape[2] if refs else backbone.codec.channels
    x = diffusion.initial_noise(b, grid, channels, seed, backbone.device)
    sigmas = diffusion.sampling_sigmas(cfg.steps, n, cfg.time_shift)
    cond = {"text": text, "refs": refs, "grid": grid, "uncond": uncond}
    x = sample(backbone_model_fn(backbone, cfg.guidance), x, sigmas, cond, callback, diffusion)
    return backbone.decode_tokens(x, grid)


def sample_grid(references: Sequence[torch.Tensor], samples: Sequence[torch.Tensor], pad: int = 2) -> np.ndarray:
    """One row per image: its K references (top-aligned) then each sample column. ``uint8 [H', W', 3]``.

    references: K tensors ``[B, 3, h_k, w_k]``; samples: columns of ``[B, 3, H, W]`` (e.g. base, post-trained);
    all in ``[0, 1]``.
    """
    b = samples[0].shape[0]
    cells = list(references) + list(samples)
    widths = [c.shape[3] for c in cells]
    row_h = max(c.shape[2] for c in cells)
    out = np.ones((b * (row_h + pad) + pad, sum(widths) + pad * (len(cells) + 1), 3), dtype=np.float32)
    for i in range(b):
        x = pad
        y = pad + i * (row_h + pad)
        for c in cells:
            img = c[i].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
            out[y: y + img.shape[0], x: x + img.shape[1]] = img
            x += img.shape[1] + pad
    return (out * 255).round().astype(np.uint8)


def world_inputs(world: Any, n: int, n_subjects: int, split: str, seed: int
                 ) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """``n`` scenes of the synthetic world: prompts, K references ``[n, 3, R, R]`` and the ground-truth scenes
    ``[n, 3, S, S]``, all in ``[0, 1]``, drawn from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, split=split, n_subjects=n_subjects) for _ in range(n)]

    def stack(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0

    refs = [stack([s.references[k] for s in scenes]) for k in range(n_subjects)]
    return [s.prompt for s in scenes], refs, stack([s.image for s in scenes])


def read_image(path: str, size: int | None = None) -> torch.Tensor:
    """An image file -> ``float [1, 3, H, W]`` in ``[0, 1]`` (RGB), resized to ``size x size`` when given."""
    from PIL import Image

    from focusdpo.data.manifest import to_rgb8

    try:
        with Image.open(path) as im:
            img = Image.fromarray(to_rgb8(im))  # 16-bit greyscale scaled, not clipped to white
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"reference image {path}: cannot be read ({e}); pass a PNG or JPEG file") from e
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255.0
