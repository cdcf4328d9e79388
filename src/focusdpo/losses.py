"""Token errors, the token-weighted Diffusion/Flow-DPO loss and the objectives of DESIGN 2.6.

Every loss returns one value per pair (``[B]``) and a metrics dict of detached ``[B]`` tensors, so the trainer
chooses the reduction and logs per-pair values. Gradients flow through the policy errors only: reference
errors, focus weights and ``M_prior`` are detached here, whatever the caller passes.

DPO (DESIGN 2.2), per pair::

    E(x)   = sum_n W[n] e(x)[n] / N                               (W = 1: the plain token mean)
    inside = -(beta / 2) * [(E_theta(x^w) - E_ref(x^w)) - (E_theta(x^l) - E_ref(x^l))]
    L      = -log sigmoid(inside)  (+ lambda_sft * E_theta(x^w))

``inside`` is the implicit reward margin ``r(x^w) - r(x^l)`` with ``r(x) = -(beta/2)(E_theta(x) - E_ref(x))``;
it is logged as ``margin``, and ``implicit_acc = [inside > 0]`` (a tie, e.g. policy == reference at the first
step, counts as wrong).

Objectives (``objective_loss``; each is registered in :mod:`focusdpo.objectives`, which the config and the step
read, so a new objective registers itself there and touches nothing here):

- ``sft``: ``L = mean_n e_theta(x^w)[n]``; no reference, no negative.
- ``dpo``: the DPO loss above with ``W = 1``, exactly Diffusion-DPO (Wallace et al. 2023) in token form.
- ``focusdpo``: the DPO loss with the focus weights ``W`` (one ``[B, N]`` tensor for both sides, or a pair
  ``(W_w, W_l)`` when ``focus.weights_from = each``).
- ``patchdpo``: PatchDPO-style regression without a reference model. Positives are weighted up inside
  ``M_prior``: ``W_p = (1 + patch_alpha * m) / mean_n(1 + patch_alpha * m)`` with ``m`` the area fraction of
  ``M_prior`` per token; negatives are trained only on tokens entirely outside ``M_prior`` (``m == 0``), the
  only tokens where the negative is known to equal the positive (a token straddling the edge mixes disrupted
  pixels into its error): ``L = E_{W_p}(x^w) + sum_n [m_n = 0] e_theta(x^l)[n] / N``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from focusdpo.objectives import Objective, get_objective, register_objective


def needs_reference(name: str) -> bool:
    """Whether objective ``name`` needs the reference model's errors (adapters off)."""
    return get_objective(name).needs_reference


def needs_negative(name: str) -> bool:
    """Whether objective ``name`` needs the negative image's errors."""
    return get_objective(name).needs_negative


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values: the prediction or target diverged upstream")


def token_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token squared error ``e[n] = mean_c (pred[n, c] - target[n, c])^2``.

    Args:
        pred: ``[B, N, C]`` model prediction (velocity or epsilon).
        target: ``[B, N, C]`` regression target.

    Returns:
        ``[B, N]`` float32 (float64 for float64 input), ``>= 0``; half/bfloat16 inputs are upcast first.
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, N, C]")
    dt = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return (pred.to(dt) - target.to(dt)).pow(2).mean(dim=-1)


def weighted_error(err: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``E = sum_n W[n] e[n] / N`` per sample; ``weights = None`` is ``W = 1`` (the plain mean).

    Args:
        err: ``[B, N]`` token errors.
        weights: ``[B, N]`` non-negative weights (treated as constants), or None.

    Returns:
        ``[B]``, differentiable in ``err``.
    """
    if err.dim() != 2:
        raise ValueError(f"err has shape {tuple(err.shape)}: expected token errors [B, N]")
    if weights is None:
        return err.mean(dim=1)
    if weights.shape != err.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)}: expected {tuple(err.shape)} like the errors")
    return (weights.detach().to(err.dtype) * err).mean(dim=1)


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion/Flow-DPO loss per pair from (weighted) errors (DESIGN 2.2).

    Worked example (``beta = 2``): ``err_w = 0.3, ref_err_w = 0.5, err_l = 0.6, ref_err_l = 0.4`` gives
    ``inside = -(2/2) * [(0.3 - 0.5) - (0.6 - 0.4)] = 0.4`` and ``loss = -log sigmoid(0.4) = log(1 + e^-0.4)
    = 0.513015``, ``implicit_acc = 1``, ``margin = 0.4``.

    Args:
        err_w, err_l: ``[B]`` policy errors ``E_theta`` on the positive / negative (differentiable).
        ref_err_w, ref_err_l: ``[B]`` reference errors ``E_ref`` (detached here).
        beta: temperature, ``> 0``.

    Returns:
        ``loss`` ``[B]`` and metrics (detached ``[B]``): ``loss``, ``implicit_acc`` (0/1), ``margin``,
        ``err_w``, ``err_l``, ``ref_err_w``, ``ref_err_l``.
    """
    args = {"err_w": err_w, "err_l": err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l}
    for name, t in args.items():
        if t.dim() != 1 or t.shape != err_w.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: all four errors must be [B] of the same B "
                             "(reduce token errors with weighted_error first)")
        _check_finite(name, t)
    if not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ValueError(f"beta={beta!r} is invalid: expected a finite value > 0")
    ref_w, ref_l = ref_err_w.detach(), ref_err_l.detach()
    # inside = -(beta/2) * [(E_theta(x^w) - E_ref(x^w)) - (E_theta(x^l) - E_ref(x^l))]
    inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    # L = -log sigmoid(inside)
    loss = -F.logsigmoid(inside)
    metrics = {"loss": loss.detach(), "implicit_acc": (inside > 0).to(loss.dtype).detach(),
               "margin": inside.detach(), "err_w": err_w.detach(), "err_l": err_l.detach(),
               "ref_err_w": ref_w, "ref_err_l": ref_l}
    return loss, metrics


def _pair_weights(weights: torch.Tensor | Sequence[torch.Tensor] | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if weights is None or isinstance(weights, torch.Tensor):
        return weights, weights
    if len(weights) != 2:
        raise ValueError(f"weights is a sequence of {len(weights)}: expected one [B, N] tensor or a pair (W_w, W_l)")
    return weights[0], weights[1]


def _require(objective: str, shape: torch.Size, **tensors: torch.Tensor | None) -> None:
    """Every named tensor is present, ``[B, N]`` of ``shape`` and finite."""
    for arg, t in tensors.items():
        if t is None:
            raise ValueError(f"{arg} is None but objective {objective!r} needs it")
        if t.shape != shape:
            raise ValueError(f"{arg} has shape {tuple(t.shape)}: expected [B, N] = {tuple(shape)} like pol_w")
        _check_finite(arg, t)


def _prior_metrics(w: torch.Tensor | None, m_prior_tok: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Mean weight inside / outside ``M_prior`` (tokens with ``m >= 0.5`` count as inside); NaN when empty."""
    if w is None or m_prior_tok is None:
        return {}
    inside = m_prior_tok.detach() >= 0.5
    out = {}
    for key, mask in (("w_in_prior", inside), ("w_out_prior", ~inside)):
        count = mask.sum(dim=1)
        total = (w.detach().float() * mask).sum(dim=1)
        out[key] = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
    return out


def _sft(pol_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = weighted_error(pol_w)  # L = mean_n e_theta(x^w)[n]
    return loss, {"loss": loss.detach(), "err_w": loss.detach()}


def _patchdpo(pol_w: torch.Tensor, pol_l: torch.Tensor, m_prior_tok: torch.Tensor, patch_alpha: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if (m_prior_tok < 0).any() or (m_prior_tok > 1).any():
        raise ValueError("m_prior_tok has values outside [0, 1]: expected area fractions from pool_to_tokens")
    if not patch_alpha >= 0:
        raise ValueError(f"patch_alpha={patch_alpha!r} is invalid: expected >= 0")
    m = m_prior_tok.detach().to(pol_w.dtype)
    # W_p = (1 + alpha * m) / mean_n(1 + alpha * m)
    w_pos = 1 + patch_alpha * m
    w_pos = w_pos / w_pos.mean(dim=1, keepdim=True)
    outside = (m == 0).to(pol_l.dtype)
    err_w = weighted_error(pol_w, w_pos)
    err_l = weighted_error(pol_l, outside)  # sum_n [m_n = 0] e_theta(x^l)[n] / N
    loss = err_w + err_l
    metrics = {"loss": loss.detach(), "err_w": err_w.detach(), "err_l": err_l.detach(),
               **_prior_metrics(w_pos, m_prior_tok)}
    return loss, metrics


def objective_loss(name: str, pol_w: torch.Tensor, pol_l: torch.Tensor | None = None,
                   ref_w: torch.Tensor | None = None, ref_l: torch.Tensor | None = None,
                   weights: torch.Tensor | Sequence[torch.Tensor] | None = None,
                   m_prior_tok: torch.Tensor | None = None, beta: float | None = None, lambda_sft: float = 0.0,
                   patch_alpha: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One entry point for the objectives of DESIGN 2.6: ``sft``, ``dpo``, ``patchdpo``, ``focusdpo``, and any
    objective registered in :mod:`focusdpo.objectives`.

    Args:
        name: a registered objective; any other name raises ``ValueError``.
        pol_w, pol_l: ``[B, N]`` policy token errors on the positive / negative (``token_errors``).
        ref_w, ref_l: ``[B, N]`` reference token errors (detached); ``dpo`` and ``focusdpo`` only.
        weights: ``focusdpo``: ``[B, N]`` focus weights for both sides, or a pair ``(W_w, W_l)``; detached.
        m_prior_tok: ``[B, N]`` area fraction of ``M_prior`` per token, in ``[0, 1]``: ``patchdpo`` needs it;
            for the DPO objectives it only adds the logged ``w_in_prior`` / ``w_out_prior``.
        beta: DPO temperature ``> 0`` (DPO objectives).
        lambda_sft: weight of the added ``E_theta(x^w)`` term (DPO objectives), ``>= 0``.
        patch_alpha: ``patchdpo`` up-weighting of positive tokens inside ``M_prior``, ``>= 0``
            (``cfg.loss.patch_alpha``).

    Returns:
        ``loss`` ``[B]`` and detached ``[B]`` metrics: always ``loss`` and ``err_w``; ``err_l`` for objectives
        with a negative; DPO objectives add ``implicit_acc``, ``margin``, ``ref_err_w``, ``ref_err_l``, ``sft``
        and, given ``m_prior_tok``, ``w_in_prior``/``w_out_prior``. Errors are the weighted ``E`` values.
    """
    objective = get_objective(name)
    if pol_w.dim() != 2:
        raise ValueError(f"pol_w has shape {tuple(pol_w.shape)}: expected token errors [B, N]")
    _require(name, pol_w.shape, pol_w=pol_w)
    return objective.loss(pol_w, pol_l, ref_w, ref_l, weights, m_prior_tok, beta, lambda_sft, patch_alpha)


def _sft_loss(pol_w: torch.Tensor, *_: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _sft(pol_w)


def _patchdpo_loss(pol_w: torch.Tensor, pol_l: torch.Tensor | None, _ref_w: object, _ref_l: object, _weights: object,
                   m_prior_tok: torch.Tensor | None, _beta: object, _lambda_sft: object, patch_alpha: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    _require("patchdpo", pol_w.shape, pol_l=pol_l, m_prior_tok=m_prior_tok)
    return _patchdpo(pol_w, pol_l, m_prior_tok, patch_alpha)


def _dpo_objective_loss(name: str, pol_w: torch.Tensor, pol_l: torch.Tensor | None, ref_w: torch.Tensor | None,
                        ref_l: torch.Tensor | None, weights: torch.Tensor | Sequence[torch.Tensor] | None,
                        m_prior_tok: torch.Tensor | None, beta: float | None, lambda_sft: float
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``dpo`` (``W = 1``) and ``focusdpo`` (focus weights): the DPO loss plus ``lambda_sft * E_theta(x^w)``."""
    _require(name, pol_w.shape, pol_l=pol_l, ref_w=ref_w, ref_l=ref_l)
    if not lambda_sft >= 0:
        raise ValueError(f"lambda_sft={lambda_sft!r} is invalid: expected >= 0")
    w_w, w_l = _pair_weights(weights) if name == "focusdpo" else (None, None)
    if name == "focusdpo":
        _require(name, pol_w.shape, weights=w_w)
        _require(name, pol_w.shape, weights=w_l)
        if (w_w < 0).any() or (w_l < 0).any():
            raise ValueError("weights has negative entries: expected focus weights >= 0 (focus_weights output)")
    elif weights is not None:
        raise ValueError("weights were given to objective 'dpo', which uses W = 1: drop them or use 'focusdpo'")
    if beta is None:
        raise ValueError(f"beta is None but objective {name!r} needs it (loss.beta)")
    err_w = weighted_error(pol_w, w_w)
    loss, metrics = dpo_loss(err_w, weighted_error(pol_l, w_l), weighted_error(ref_w.detach(), w_w),
                             weighted_error(ref_l.detach(), w_l), beta)
    # + lambda_sft * E_theta(x^w)
    sft = lambda_sft * err_w
    loss = loss + sft
    w_logged = torch.ones_like(pol_w) if w_w is None else w_w
    metrics.update(loss=loss.detach(), sft=sft.detach(), **_prior_metrics(w_logged, m_prior_tok))
    return loss, metrics


def _dpo_loss(pol_w: torch.Tensor, pol_l: torch.Tensor | None, ref_w: torch.Tensor | None,
              ref_l: torch.Tensor | None, weights: object, m_prior_tok: torch.Tensor | None, beta: float | None,
              lambda_sft: float, _patch_alpha: object = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _dpo_objective_loss("dpo", pol_w, pol_l, ref_w, ref_l, weights, m_prior_tok, beta, lambda_sft)


def _focusdpo_loss(pol_w: torch.Tensor, pol_l: torch.Tensor | None, ref_w: torch.Tensor | None,
                   ref_l: torch.Tensor | None, weights: object, m_prior_tok: torch.Tensor | None, beta: float | None,
                   lambda_sft: float, _patch_alpha: object = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _dpo_objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights, m_prior_tok, beta, lambda_sft)


for _objective in (
        Objective("sft", needs_reference=False, needs_negative=False, uses_focus=False, loss=_sft_loss,
                  summary="flow regression on the positives"),
        Objective("dpo", needs_reference=True, needs_negative=True, uses_focus=False, loss=_dpo_loss,
                  summary="Diffusion-DPO (W = 1)"),
        Objective("patchdpo", needs_reference=False, needs_negative=True, uses_focus=False, loss=_patchdpo_loss,
                  summary="PatchDPO-style patch-weighted regression, no reference model"),
        Objective("focusdpo", needs_reference=True, needs_negative=True, uses_focus=True, loss=_focusdpo_loss,
                  summary="DPO with the adaptive focus weights")):
    register_objective(_objective, replace=True)
