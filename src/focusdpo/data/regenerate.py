"""The ``regenerate`` disruption (DESIGN 2.7): re-noise a subject's region and denoise it again with the base model.

Importing this module registers ``regenerate`` in the disruption registry (``needs=("backbone",)``): a build
that wants it passes ``extras={"backbone": ..., "world": ... (toy only), "regenerate": RegenerateSettings(...)}``
(:func:`regenerate_extras` makes them from a config).

How a region is regenerated (flow matching, FLUX convention, :func:`regenerate_region`): the positive's tokens
``x_0`` and noise ``eps`` (from the record's RNG) give ``x_s = (1 - s) x_0 + s eps`` at ``s = strength``; Euler
steps from ``strength`` to 0 use the base model's velocity (conditioned on the record's prompt and references)
on tokens touching the region, and the exact path velocity ``eps - x_0`` on every other token, so those stay on
the positive's own noising path (inpainting; outside pixels are then restored exactly by ``apply_disruption``).

In the toy world a regenerated region is kept only when the world's ground truth says it really changed: the
positive (a ground-truth render) is read with the toy metrics (:mod:`focusdpo.world.metrics`), those readings
become the truth identities, and the negative is scored against them. The negative is kept when the target
subject lost one of its attributes (``lost``) or shows another subject's (``leaked``), both recorded in the
record's params; otherwise the disruption returns the positive unchanged, which the builder treats as a failed
draw and redraws (possibly another disruption).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from focusdpo.data.disruptions import DisruptionContext, DisruptionError, register_disruption


@dataclass
class RegenerateSettings:
    """How ``regenerate`` re-noises and denoises.

    strength: the noise level ``s`` in ``(0, 1]`` the region is taken back to (1 = pure noise);
    steps: Euler steps from ``strength`` to 0; guidance: classifier-free guidance scale (1 = off).
    """

    strength: float = 0.75
    steps: int = 12
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:
            raise ValueError(f"regenerate strength={self.strength} is invalid: allowed (0, 1]")
        if self.steps < 1:
            raise ValueError(f"regenerate steps={self.steps} is invalid: allowed >= 1")
        if self.guidance < 0:
            raise ValueError(f"regenerate guidance={self.guidance} is invalid: allowed >= 0")


def _to_float(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def token_mask(region: np.ndarray, patch: int) -> torch.Tensor:
    """bool ``[H, W]`` -> float ``[1, N, 1]``: 1 on tokens holding any region pixel (row-major grid)."""
    h, w = region.shape
    if h % patch or w % patch:
        raise DisruptionError(f"regenerate: image {h}x{w} is not a multiple of the backbone patch {patch}")
    t = torch.from_numpy(region.astype(np.float32)).reshape(h // patch, patch, w // patch, patch)
    return (t.amax(dim=(1, 3)) > 0).float().reshape(1, -1, 1)


def regenerate_region(backbone: Any, image: np.ndarray, region: np.ndarray, prompt: str,
                      references: Sequence[np.ndarray], settings: RegenerateSettings, rng: np.random.Generator
                      ) -> np.ndarray:
    """Re-noise the tokens touching ``region`` to ``settings.strength`` and denoise them with ``backbone``.

    image: uint8 ``[H, W, 3]``; region: bool ``[H, W]``; references: K uint8 ``[h_k, w_k, 3]``.
    Returns uint8 ``[H, W, 3]`` (tokens away from the region come back as the positive, up to rounding).
    """
    return regenerate_regions(backbone, [image], [region], [prompt], [references], settings, [rng])[0]


@torch.no_grad()
def regenerate_regions(backbone: Any, images: Sequence[np.ndarray], regions: Sequence[np.ndarray],
                       prompts: Sequence[str], references: Sequence[Sequence[np.ndarray]],
                       settings: RegenerateSettings, rngs: Sequence[np.random.Generator]) -> list[np.ndarray]:
    """:func:`regenerate_region` of B images in one batch (one forward per Euler step for all of them).

    The images share one size and their references one count and sizes; image ``i``'s noise comes from
    ``rngs[i]`` (the same numbers as a batch of one), so a batch of one is :func:`regenerate_region` exactly.
    """
    from focusdpo.backbones.base import TextCond
    from focusdpo.sampling import backbone_model_fn, sample

    b = len(images)
    x0 = backbone.encode_images(_to_float(images))
    n_refs = len(references[0])
    refs = [backbone.encode_images(_to_float([r[k] for r in references])) for k in range(n_refs)]
    device = x0.tokens.device
    mask = torch.cat([token_mask(r, backbone.patch) for r in regions]).to(device)
    shape = (1, *x0.tokens.shape[1:])
    eps = torch.cat([torch.from_numpy(rng.standard_normal(shape)).float() for rng in rngs]).to(device)
    s0 = settings.strength
    x = (1 - s0) * x0.tokens + s0 * eps
    inner = backbone_model_fn(backbone, settings.guidance)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return mask * inner(x_t, t, **cond) + (1 - mask) * (eps - x0.tokens)

    text = backbone.encode_prompts(list(prompts))
    uncond: TextCond | None = backbone.encode_prompts([""] * b) if settings.guidance != 1.0 else None
    sigmas = torch.linspace(s0, 0.0, settings.steps + 1)
    x = sample(model_fn, x, sigmas, {"text": text, "refs": refs, "grid": x0.grid, "uncond": uncond})
    out = backbone.decode_tokens(x, x0.grid).permute(0, 2, 3, 1).cpu().numpy()
    return list((out * 255).round().clip(0, 255).astype(np.uint8))


def judge_toy(world: Any, prompt: str, positive: np.ndarray, negative: np.ndarray, target: int,
              references: Sequence[np.ndarray]) -> tuple[list[str], list[str]] | None:
    """Which attributes subject ``target`` lost and which other subjects' attributes it shows in ``negative``.

    The truth is the toy metrics' reading of the ground-truth ``positive``; returns ``(lost, leaked)``
    attribute names, or None when the positive's target cannot be read (no ground truth to judge against).
    """
    from focusdpo.world import Identity, Scene
    from focusdpo.world.metrics import score_scene
    from focusdpo.world.prompts import parse_prompt

    nouns, positions, background = parse_prompt(prompt)
    placeholder = [Identity(-1, noun, "red", "stripes", "blue", "dot") for noun in nouns]

    def scene(identities: list[Identity]) -> Scene:
        return Scene(prompt, identities, positions, background, [], positive, np.zeros((0,)), list(references), [])

    reads = score_scene(positive, scene(placeholder), world)["subjects"]
    if not reads[target]["present"]:
        return None
    truth = [Identity(-1 - i, r["read"]["class"], r["read"]["body"], r["read"]["pattern"],
                      r["read"]["pattern_colour"], r["read"]["detail"]) for i, r in enumerate(reads)]
    judged = score_scene(negative, scene(truth), world)["subjects"][target]
    lost = sorted(a for a, v in judged["fidelity"].items() if v < 1)
    leaked = sorted(a for a, v in judged["leakage"].items() if not np.isnan(v) and v > 0)
    return lost, leaked


def regenerate(image: np.ndarray, regions: np.ndarray, target: int, rng: np.random.Generator,
               ctx: DisruptionContext) -> tuple[np.ndarray, dict[str, Any]]:
    """The registered disruption (signature of :mod:`focusdpo.data.disruptions`)."""
    settings = ctx.extras.get("regenerate") or RegenerateSettings()
    proposal = regenerate_region(ctx.extras["backbone"], image, regions[target], ctx.prompt, ctx.references,
                                 settings, rng)
    params: dict[str, Any] = {"strength": settings.strength, "steps": settings.steps, "guidance": settings.guidance}
    world = ctx.extras.get("world")
    if world is None:
        return proposal, {**params, "judged": False}
    negative = np.where(regions[target][..., None], proposal, image)
    verdict = judge_toy(world, ctx.prompt, image, negative, target, ctx.references)
    if verdict is None or not (verdict[0] or verdict[1]):
        # Nothing really changed by the world's ground truth: return the positive, so the builder redraws.
        return image.copy(), {**params, "judged": True, "kept": False}
    return proposal, {**params, "judged": True, "kept": True, "lost": verdict[0], "leaked": verdict[1]}


def regenerate_extras(cfg: Any, settings: RegenerateSettings | None = None, device: str | None = None,
                      toy: bool = True) -> dict[str, Any]:
    """``extras`` for a DIP build that draws ``regenerate``: the base backbone of ``cfg.model`` (and the world
    of ``cfg.world`` when ``toy``, which turns on the ground-truth check)."""
    from focusdpo.backbones import load_backbone

    extras: dict[str, Any] = {"backbone": load_backbone(cfg.model, device),
                              "regenerate": settings or RegenerateSettings()}
    if toy:
        from focusdpo.world import World

        extras["world"] = World(cfg.world)
    return extras


register_disruption("regenerate", regenerate, needs=("backbone",), replace=True)
