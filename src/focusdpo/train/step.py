"""One training step on a batch of DIP pairs, in the order of DESIGN section 3's data flow:

encode -> shared noise and timestep per pair -> reference prediction (no grad, adapters off) -> policy
prediction with the focus tap (focusdpo only) -> SPAF + stored ``M_d`` + gating -> ``W`` -> objective.

The step knows only the backbone contract (:mod:`focusdpo.backbones.base`). Forwards go through ``policy``
(a callable with ``Backbone.predict``'s signature), so that the trainer can route them through the module
accelerate wrapped (DDP/FSDP/DeepSpeed); the reference forward is the same call inside ``backbone.reference()``
(adapters off) and ``no_grad``.

Both sides of a pair go through one forward of batch ``2B`` (positives first, then negatives): same text,
same references, same ``eps`` and the same ``s`` (DESIGN 2.2). Noise and timesteps are drawn from a key the
caller gives (:class:`NoiseKey`), which makes the step a pure function of its inputs (exact resume, equal results
for any number of processes).

How the tokens are noised and what the model regresses are the backbone's diffusion convention
(``backbone.diffusion``, :mod:`focusdpo.backbones.diffusion`): for every built-in backbone FLUX's flow matching,
``x_t = (1 - s) x_0 + s eps``, target ``v = eps - x_0``, ``s`` drawn logit-normal then shifted as FLUX does for the
token count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from focusdpo.backbones.base import Backbone, FocusTap, TextCond, Tokens
from focusdpo.backbones.diffusion import FLOW, Diffusion, diffusion_of
from focusdpo.config import Config, FocusConfig, LossConfig
from focusdpo.focus import (
    claim_tokens,
    complexity_map,
    focus_sets,
    focus_weights,
    pool_to_tokens,
    readout_scores,
    subject_top_k,
)
from focusdpo.losses import needs_negative, needs_reference, objective_loss, token_errors
from focusdpo.objectives import get_objective

Policy = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]



@dataclass
class PairInputs:
    """A batch encoded by the backbone: ``x0_w``/``x0_l`` ``[B, N, C]`` on ``grid``, ``text``, K ``refs``."""

    x0_w: torch.Tensor
    x0_l: torch.Tensor
    grid: tuple[int, int]
    text: TextCond
    refs: list[Tokens]


@dataclass
class FocusResult:
    """The adaptive focus of one batch at token resolution (``N = h * w``).

    ``W`` ``[B, N]`` mean 1; ``matches``/``scores`` ``[B, K, N]`` (SPAF ``M'_k`` and ``S_k``); ``regions``
    ``[B, K, N]`` area fractions; ``m_prior`` ``[B, N]`` area fraction; ``m_d`` ``[B, N]`` in [0, 1];
    ``sets``: ``aligned``/``confused``/``union`` ``[B, N]`` bool and ``a`` ``[B]``; ``stats``: ``[B]`` tensors
    of :func:`focusdpo.focus.focus_weights`.
    """

    W: torch.Tensor
    matches: torch.Tensor
    scores: torch.Tensor
    regions: torch.Tensor
    m_prior: torch.Tensor
    m_d: torch.Tensor
    sets: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


@dataclass
class StepOutput:
    """``loss``: scalar to back-propagate (mean over pairs); ``metrics``: name -> ``[B]`` detached values;
    ``focus``: the focus maps when the step computed them (``focusdpo``, or ``focus.log_alignment``), else None."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    focus: FocusResult | None


# ------------------------------------------------------------------------------------------ noise and time


@dataclass
class NoiseKey:
    """The noise of one micro-batch: a generator seeded by ``(seed, step, micro)`` draws it for the whole
    global batch (``batch * world`` pairs) and each process takes its contiguous slice (rank order), so the
    pairs get the same noise for any number of processes and after a resume."""

    seed: int
    step: int
    micro: int = 0
    rank: int = 0
    world: int = 1

    def draw(self, b: int, n_tokens: int, channels: int, cfg: LossConfig, diffusion: Diffusion = FLOW
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``eps [b, N, C]`` and ``s [b]`` of this process's ``b`` pairs (CPU), drawn by ``diffusion.draw``."""
        state = np.random.SeedSequence([self.seed, self.step, self.micro]).generate_state(2, dtype=np.uint64)
        gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        eps, s = diffusion.draw(gen, b * self.world, (n_tokens, channels), n_tokens, cfg)
        part = slice(self.rank * b, (self.rank + 1) * b)
        return eps[part], s[part]


# ------------------------------------------------------------------------------------------------ encoding


def encode_batch(backbone: Backbone, batch: Mapping[str, Any]) -> PairInputs:
    """Collated batch (docs/architecture.md, DIP data) -> tokens on the backbone's device. No gradients."""
    with torch.no_grad():
        w = backbone.encode_images(batch["positive"])
        neg = backbone.encode_images(batch["negative"])
        refs = [backbone.encode_images(r) for r in batch["references"]]
        text = backbone.encode_prompts(batch["prompt"])
    return PairInputs(w.tokens, neg.tokens, w.grid, text, refs)


def _double(inputs: PairInputs) -> tuple[TextCond, list[Tokens]]:
    """Text and references repeated for the ``[positives; negatives]`` batch of ``2B``."""
    text = TextCond.cat([inputs.text, inputs.text])
    refs = [Tokens(torch.cat([r.tokens, r.tokens]), r.grid) for r in inputs.refs]
    return text, refs


# --------------------------------------------------------------------------------------------------- focus


def token_masks(batch: Mapping[str, Any], patch: int, ref_grids: Sequence[tuple[int, int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The batch's masks at token resolution (area fractions in [0, 1]).

    Returns ``regions [B, K, N]``, ``m_prior [B, N]``, K reference masks ``[B, M_k]`` and ``m_d [B, N]``.
    ``m_d`` is the stored DPCE map; it must have been computed at the backbone's patch size.
    """
    regions = pool_to_tokens(batch["regions"].to(device), patch).flatten(2)
    m_prior = pool_to_tokens(batch["m_prior"].to(device), patch).flatten(1)
    ref_masks = [pool_to_tokens(m.to(device), patch).flatten(1) for m in batch["ref_masks"]]
    for k, (m, grid) in enumerate(zip(ref_masks, ref_grids, strict=True)):
        if m.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"ref_masks[{k}] pools to {m.shape[1]} tokens but reference {k} has {grid} tokens")
    m_d = batch["m_d"].to(device)
    if int(batch["m_d_patch"]) != patch or m_d.flatten(1).shape[1] != regions.shape[2]:
        raise ValueError(f"the DIP set's m_d was computed with {batch['m_d_patch']} px per token but the backbone "
                         f"uses patch={patch}: rebuild the DIP set for this model (focusdpo dip build)")
    return regions, m_prior, ref_masks, m_d.flatten(1).float()


def reference_complexity(references: Sequence[torch.Tensor], ref_masks: Sequence[torch.Tensor], patch: int,
                         cfg: FocusConfig) -> torch.Tensor:
    """Each reference's DPCE complexity (DESIGN 2.4) averaged over its subject's tokens: ``[B, K]`` in [0, 1].

    references: K images ``[B, 3, R, R]`` in [0, 1]; ref_masks: K token masks ``[B, M_k]`` (area fractions).
    """
    out = []
    for ref, mask in zip(references, ref_masks, strict=True):
        c = complexity_map(ref.to(mask.device), patch, cfg.sigma, cfg.bins).flatten(1)  # [B, M_k]
        out.append((c * mask).sum(1) / mask.sum(1).clamp_min(1e-6))
    return torch.stack(out, dim=1)


def compute_focus(tap: FocusTap, masks: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor],
                  cfg: FocusConfig, ref_complexity: torch.Tensor | None = None) -> FocusResult:
    """SPAF (``cfg.readout`` of the tap) + stored DPCE + gating -> ``W`` (DESIGN 2.3-2.5).

    tap: the policy's :class:`~focusdpo.backbones.base.FocusTap` of the batch (detached).
    masks: the output of :func:`token_masks`. ref_complexity: ``[B, K]`` (:func:`reference_complexity`),
    needed when ``cfg.ref_complexity_scale > 0``.
    """
    regions, m_prior, ref_masks, m_d = masks
    scores = readout_scores(cfg.readout, tap.field, tap.target, tap.refs, ref_masks)  # S_k [B, K, N]
    matches = claim_tokens(scores, subject_top_k(regions, cfg.rho))  # k_k = ceil(rho * |P_k|)
    W, stats = focus_weights(matches, regions.float(), m_d if cfg.dpce else None, cfg, ref_complexity)
    sets = focus_sets(matches, regions.float())
    return FocusResult(W, matches, scores, regions, m_prior, m_d, sets, stats)


# ---------------------------------------------------------------------------------------------------- step


def _reference_errors(policy: Policy, backbone: Backbone, x_t: torch.Tensor, s: torch.Tensor, text: TextCond,
                      refs: list[Tokens], grid: tuple[int, int], target: torch.Tensor) -> torch.Tensor:
    """Token errors ``[2B, N]`` of the frozen reference (adapters off, no grad) on ``[x_t^w; x_t^l]``.

    It runs through ``policy`` too: under FSDP only the wrapped module gathers the sharded base weights.
    """
    with torch.no_grad(), backbone.reference():
        pred, _ = policy(x_t, s, text, refs, grid, tap=False)
    return token_errors(pred, target).detach()


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(name)


class NonFiniteError(FloatingPointError):
    """A tensor of the step is NaN or infinite; ``metric`` names it (the trainer adds the step)."""

    def __init__(self, metric: str) -> None:
        super().__init__(f"non-finite {metric}")
        self.metric = metric


def pair_step(policy: Policy, backbone: Backbone, batch: Mapping[str, Any], noise: NoiseKey, cfg: Config
              ) -> StepOutput:
    """Loss and metrics of ``cfg.train.objective`` on one batch of pairs.

    Args:
        policy: ``Backbone.predict``-like callable of the trainable model (possibly wrapped for DDP).
        backbone: the backbone (encoders, reference switch, token grid).
        batch: a collated DIP batch (docs/architecture.md); images ``[B, 3, H, W]`` in [0, 1].
        noise: which noise and timesteps the pairs get (both sides of a pair share them).
        cfg: the run config (objective, loss constants, focus config).

    Returns:
        :class:`StepOutput` with a scalar loss (mean over the B pairs) and ``[B]`` metrics. Raises
        :class:`NonFiniteError` when a prediction or the loss is NaN/inf.
    """
    objective = cfg.train.objective
    inputs = encode_batch(backbone, batch)
    device = inputs.x0_w.device
    b, n = inputs.x0_w.shape[:2]
    sides = 2 if needs_negative(objective) else 1
    diffusion = diffusion_of(backbone)
    eps, s = noise.draw(b, n, inputs.x0_w.shape[2], cfg.loss, diffusion)
    eps, s = eps.to(device, inputs.x0_w.dtype).repeat(sides, 1, 1), s.to(device).repeat(sides)
    # one batch of [positives; negatives] with the same eps and s on both sides (DESIGN 2.2)
    x0 = torch.cat([inputs.x0_w, inputs.x0_l][:sides])
    x_t, target = diffusion.noisy(x0, eps, s)
    text, refs = _double(inputs) if sides == 2 else (inputs.text, inputs.refs)
    ref_err = None
    if needs_reference(objective):
        ref_err = _reference_errors(policy, backbone, x_t, s, text, refs, inputs.grid, target)
        _check_finite("reference prediction", ref_err)
    masks = token_masks(batch, backbone.patch, [r.grid for r in inputs.refs], device)
    use_focus = get_objective(objective).uses_focus or cfg.focus.log_alignment
    tap_masks = [torch.cat([m] * sides) for m in masks[2]] if use_focus else None
    pred, tap = policy(x_t, s, text, refs, inputs.grid, tap=use_focus, ref_masks=tap_masks)
    err = token_errors(pred, target)  # [sides * B, N]
    _check_finite("policy prediction", err)
    ref_c = None
    if use_focus and cfg.focus.ref_complexity_scale > 0:
        ref_c = reference_complexity(batch["references"], masks[2], backbone.patch, cfg.focus)
    focus = compute_focus(tap.select(slice(0, b)), masks, cfg.focus, ref_c) if use_focus else None
    weights = _objective_weights(objective, focus, tap, b, masks, cfg, ref_c)
    loss, metrics = objective_loss(
        objective, err[:b], err[b:] if sides == 2 else None, None if ref_err is None else ref_err[:b],
        None if ref_err is None else ref_err[b:], weights=weights, m_prior_tok=masks[1], beta=cfg.loss.beta,
        lambda_sft=cfg.loss.lambda_sft, patch_alpha=cfg.loss.patch_alpha)
    _check_finite("loss", loss)
    if focus is not None:
        # the objective's own weight metrics win (PatchDPO's patch weights are not the focus weights)
        metrics = {**_focus_metrics(focus, masks[1], objective), **metrics}
    return StepOutput(loss.mean(), {k: v.detach() for k, v in metrics.items()}, focus)


def _objective_weights(objective: str, focus: FocusResult | None, tap: FocusTap | None, b: int, masks: tuple,
                       cfg: Config, ref_c: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """``W`` for ``focusdpo`` (from the positive, or ``(W_w, W_l)`` with ``focus.weights_from=each``)."""
    if not get_objective(objective).uses_focus or focus is None or tap is None:
        return None
    if cfg.focus.weights_from == "each":
        return focus.W, compute_focus(tap.select(slice(b, 2 * b)), masks, cfg.focus, ref_c).W
    return focus.W


def _focus_metrics(focus: FocusResult, m_prior: torch.Tensor, objective: str) -> dict[str, torch.Tensor]:
    """Alignment ``a``, gate and the mean weight inside / outside ``M_prior`` and on the confused (``M_s``) and
    aligned (``A``) tokens (``[B]`` each; NaN where a set is empty).

    For objectives other than ``focusdpo`` the loss uses no focus weights, so the logged weights are 1.
    """
    w = focus.W if get_objective(objective).uses_focus else torch.ones_like(focus.W)
    inside = m_prior >= 0.5
    out = {"a": focus.stats["a"], "gate": focus.stats["gate"]}
    sets = (("w_in_prior", inside), ("w_out_prior", ~inside), ("w_confused", focus.sets["confused"]),
            ("w_aligned", focus.sets["aligned"]))
    for key, mask in sets:
        count = mask.sum(dim=1)
        total = (w.float() * mask).sum(dim=1)
        out[key] = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
    return out
