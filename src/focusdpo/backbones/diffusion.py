"""The diffusion convention a backbone exposes (``backbone.diffusion``): how training noises and what it regresses,
how sampling starts and steps.

The step, the trainer, the sampler, pretraining and the focus probe call only this object, never a formula of
their own, so a backbone with another convention (epsilon prediction, a DDPM schedule: SDXL, a later issue) brings
its own :class:`Diffusion` and nothing else changes. The one built in is FLUX's flow matching:

- noising: ``x_t = (1 - s) x_0 + s eps`` with ``s`` (``sigma``) in ``[0, 1]``, ``s = 1`` pure noise; the model
  predicts the velocity ``v = eps - x_0``;
- training timesteps: ``s = sigmoid(u)``, ``u ~ N(loss.logit_mean, loss.logit_std)``, shifted towards noise by
  FLUX's resolution-dependent ``mu`` when ``loss.time_shift`` (:func:`time_shift`, :func:`shift_mu`);
- sampling: ``s`` uniform from 1 to 0, shifted the same way when ``sample.time_shift``; Euler steps
  ``x <- x + (s_next - s) v``; initial noise ``randn(B, N, C)`` from a CPU generator.

FLUX.2 keeps the noising and the Euler step and replaces the schedule and the initial noise with its pipeline's
(``focusdpo.backbones.flux2.Flux2FlowMatching``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


def shift_mu(n_tokens: int, base: float = 0.5, top: float = 1.15, lo: int = 256, hi: int = 4096) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the image token count through (lo, base), (hi, top)."""
    return base + (top - base) * (n_tokens - lo) / (hi - lo)


def time_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """``e^mu / (e^mu + 1/s - 1)`` elementwise; maps 0 -> 0 and 1 -> 1, pushes mid values towards 1 for mu > 0."""
    s = sigma.clamp(0.0, 1.0)
    out = math.exp(mu) / (math.exp(mu) + (1.0 / s.clamp_min(1e-12) - 1.0))
    return torch.where(s <= 0, torch.zeros_like(s), out)


@runtime_checkable
class Diffusion(Protocol):
    """A backbone's diffusion convention (see the module doc for the flow-matching one)."""

    prediction: str  # what the model predicts: "flow" (velocity) or "epsilon"; loss.prediction must name it

    def draw(self, generator: torch.Generator, n: int, shape: tuple[int, int], n_tokens: int, cfg: Any
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training noise ``eps [n, *shape]`` and timesteps ``t [n]`` drawn on the CPU from ``generator``
        (``cfg``: :class:`~focusdpo.config.LossConfig`)."""

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` and the regression target of clean tokens ``x0 [B, N, C]`` at ``t [B]``."""

    def sampling_sigmas(self, steps: int, n_tokens: int, shift: bool = True) -> torch.Tensor:
        """The sampler's ``float [steps + 1]`` timesteps, from pure noise to clean."""

    def initial_noise(self, batch: int, grid: tuple[int, int], channels: int, seed: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """The sampler's starting point ``float [B, h * w, C]`` for ``seed`` (the same numbers on every device)."""

    def step(self, x: torch.Tensor, pred: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """One sampler update from ``t`` to ``t_next`` given the model's prediction at ``(x, t)``."""


class FlowMatching:
    """FLUX's flow matching (module doc). Stateless; ``FLOW`` is the shared instance."""

    prediction = "flow"

    def draw(self, generator: torch.Generator, n: int, shape: tuple[int, int], n_tokens: int, cfg: Any
             ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.randn((n, *shape), generator=generator)
        u = torch.randn((n,), generator=generator) * cfg.logit_std + cfg.logit_mean
        s = torch.sigmoid(u).clamp(1e-4, 1 - 1e-4)
        if cfg.time_shift:
            s = time_shift(s, shift_mu(n_tokens))
        return eps, s

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = t.to(x0.dtype)[:, None, None]
        return (1 - s) * x0 + s * eps, eps - x0

    def sampling_sigmas(self, steps: int, n_tokens: int, shift: bool = True) -> torch.Tensor:
        if steps < 1:
            raise ValueError(f"sample.steps={steps} is invalid: allowed >= 1")
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if shift:
            sigmas = time_shift(sigmas, shift_mu(n_tokens))
        return sigmas.float()

    def initial_noise(self, batch: int, grid: tuple[int, int], channels: int, seed: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
        return noise_from_seed((batch, grid[0] * grid[1], channels), seed, device)

    def step(self, x: torch.Tensor, pred: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        return x + (t_next - t) * pred

    def __repr__(self) -> str:
        return "FlowMatching()"


FLOW = FlowMatching()


def noise_from_seed(shape: Sequence[int], seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed`` (the same numbers on every device)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen).to(device)


def diffusion_of(backbone: Any) -> Diffusion:
    """``backbone.diffusion``; flow matching for a backbone that declares none (FLUX-class fakes in tests)."""
    return getattr(backbone, "diffusion", None) or FLOW
