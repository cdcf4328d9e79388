"""Structure-Preserving Attention Field (SPAF, DESIGN 2.3): where the model puts each subject.

Every target token ``n`` gets a score ``S_k[n]`` for every reference subject ``k`` from one readout of the
policy's own forward (detached, :class:`~focusdpo.backbones.base.FocusTap`), and each subject claims its
``k_k`` best-scoring target tokens (:func:`claim_tokens`). Readouts (``focus.readout``, :func:`readout_scores`):

- ``attention`` (default): the model's attention field, ``S_k[n]`` = softmax mass that target query ``n`` puts
  on reference k's keys, mask-weighted, head-averaged (computed by the backbone inside its attention).
- ``cosine``: pool each subject's tapped hidden states over its reference mask to ``r_k`` and score
  ``cos(T[n], r_k)`` (:func:`match_subjects`, the first implementation, kept as an ablation).
- ``cosine_centered``: the same after subtracting the mean hidden state of the sample's image tokens
  (target and references), which removes the component every token shares.

Measured on the shipped base (``focusdpo focus-probe``, docs/focus-probe.md): the cosine readout is near
chance at ``s >= 0.7``, where half of the training timesteps fall; the attention field is not.

Choices the design leaves open, made here:

- Reference masks may be soft (area fractions); pooling is the mask-weighted mean, so a token with
  mask 0 never moves ``r_k``. A subject whose mask sums to 0 in some sample is an error, not a fallback.
- Inputs are checked for NaN/inf through their results (pooled vectors, scores), which costs no extra pass
  over the ``[B, N, D]`` features.
- Scores are computed in float32 (float64 stays float64) whatever the features' dtype, so that bfloat16
  features rank tokens the same way their float32 originals do (up to the features' own rounding).
- Top-k per (sample, subject) with a different ``k`` each: a stable descending sort gives each token its
  rank, and a token is claimed when ``rank < k_k`` (ties broken by token index, lowest first).
- A token claimed by several subjects goes to the claimant with the highest score (ties: lowest subject
  index). A subject may therefore end with fewer than ``k_k`` tokens; this is the design's rule.
- ``subject_top_k`` turns area-pooled regions into ``k_k = ceil(rho * |P_k|)`` tokens with
  ``|P_k| = sum_n P_k[n]``; a tolerance of ``1e-4`` token absorbs the rounding of area sums
  (``rho * |P_k| = 3.00001`` gives 3, not 4), and ``k_k`` is capped at ``N``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_AREA_TOL = 1e-4


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values: check the model's tapped features / the data")


def subject_top_k(regions: torch.Tensor, rho: float) -> torch.Tensor:
    """Top-k sizes of SPAF: ``k_k = ceil(rho * |P_k|)`` tokens per sample and subject.

    Args:
        regions: ``[B, K, N]`` or ``[B, K, h, w]`` float in ``[0, 1]``, area-pooled subject regions ``P_k``.
        rho: size factor, ``> 0``.

    Returns:
        ``[B, K]`` long in ``[1, N]``.
    """
    if regions.dim() not in (3, 4):
        raise ValueError(f"regions has shape {tuple(regions.shape)}: expected [B, K, N] or [B, K, h, w]")
    if not rho > 0:
        raise ValueError(f"rho={rho!r} is invalid: expected > 0")
    _check_finite("regions", regions)
    flat = regions.flatten(2).to(_score_dtype(regions.dtype))
    area = flat.sum(dim=-1)  # [B, K]
    empty = (area <= 0).nonzero()
    if len(empty):
        b, k = empty[0].tolist()
        raise ValueError(f"regions: subject {k} of sample {b} has an empty region P_k; every subject must "
                         "cover at least part of a token (drop or fix the record)")
    k_k = torch.ceil(rho * area - _AREA_TOL).clamp_(1, flat.shape[-1])
    return k_k.long()


def pool_subjects(ref_feats: Sequence[torch.Tensor], ref_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mask-weighted mean of each reference's tokens: ``r_k = sum_j m_k[j] R_k[j] / sum_j m_k[j]``.

    Args:
        ref_feats: K tensors ``[B, M_k, D]``.
        ref_masks: K tensors ``[B, M_k]`` float in ``[0, 1]`` (or bool), token-resolution subject masks.

    Returns:
        ``[B, K, D]`` in float32 (float64 for float64 features).
    """
    pooled = []
    for k, (feats, mask) in enumerate(zip(ref_feats, ref_masks, strict=True)):
        if feats.dim() != 3 or mask.shape != feats.shape[:2]:
            raise ValueError(f"ref_feats[{k}] {tuple(feats.shape)} and ref_masks[{k}] {tuple(mask.shape)} "
                             "do not match: expected [B, M_k, D] and [B, M_k]")
        dt = _score_dtype(feats.dtype)
        m = mask.to(dt)
        if (m < 0).any():
            raise ValueError(f"ref_masks[{k}] has negative values: expected [0, 1]")
        total = m.sum(dim=1)  # [B]
        if (total <= 0).any():
            b = int((total <= 0).nonzero()[0])
            raise ValueError(f"ref_masks[{k}] is empty in sample {b}: the reference subject covers no token "
                             "(pass all-ones when the mask is unknown)")
        pooled.append(torch.einsum("bm,bmd->bd", m, feats.to(dt)) / total[:, None])
    return torch.stack(pooled, dim=1)


def _validate(tgt_feats: torch.Tensor, ref_feats: Sequence[torch.Tensor], ref_masks: Sequence[torch.Tensor],
              top_k: int | torch.Tensor) -> None:
    if tgt_feats.dim() != 3:
        raise ValueError(f"tgt_feats has shape {tuple(tgt_feats.shape)}: expected [B, N, D]")
    b, _, d = tgt_feats.shape
    if len(ref_feats) == 0 or len(ref_feats) != len(ref_masks):
        raise ValueError(f"ref_feats ({len(ref_feats)}) and ref_masks ({len(ref_masks)}) must be two "
                         "non-empty lists of the same length K")
    for k, feats in enumerate(ref_feats):
        if feats.dim() != 3 or feats.shape[0] != b or feats.shape[2] != d:
            raise ValueError(f"ref_feats[{k}] has shape {tuple(feats.shape)}: expected [B={b}, M_k, D={d}]")
    if isinstance(top_k, torch.Tensor):
        if top_k.shape != (b, len(ref_feats)) or top_k.is_floating_point():
            raise ValueError(f"top_k has shape {tuple(top_k.shape)} and dtype {top_k.dtype}: expected an int "
                             f"or a long tensor [B={b}, K={len(ref_feats)}]")
        if (top_k < 0).any():
            raise ValueError("top_k has negative entries: expected >= 0")
    elif not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} is invalid: expected an int >= 0 or a long tensor [B, K]")


def match_subjects(tgt_feats: torch.Tensor, ref_feats: Sequence[torch.Tensor], ref_masks: Sequence[torch.Tensor],
                   top_k: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPAF matching: which target tokens each reference subject claims (DESIGN 2.3, steps 2-4).

    Args:
        tgt_feats: ``[B, N, D]`` hidden states of the target tokens (any float dtype; not differentiated).
        ref_feats: K tensors ``[B, M_k, D]``, hidden states of each reference's tokens.
        ref_masks: K tensors ``[B, M_k]`` in ``[0, 1]``, subject masks at reference-token resolution.
        top_k: tokens claimed per subject: one int for all, or ``[B, K]`` long (see ``subject_top_k``).

    Returns:
        ``(matches, scores)``: ``matches`` ``[B, K, N]`` bool, at most one True per (sample, token);
        ``scores`` ``[B, K, N]`` float32 (float64 for float64 input) cosine similarities in ``[-1, 1]``.
    """
    _validate(tgt_feats, ref_feats, ref_masks, top_k)
    with torch.no_grad():
        scores = cosine_scores(tgt_feats, ref_feats, ref_masks)
        matches = claim_tokens(scores, top_k)
    return matches, scores


def cosine_scores(tgt_feats: torch.Tensor, ref_feats: Sequence[torch.Tensor], ref_masks: Sequence[torch.Tensor],
                  centered: bool = False) -> torch.Tensor:
    """Cosine readout ``S_k[n] = cos(T[n], r_k)``: ``[B, K, N]`` float32 (float64 for float64 input) in [-1, 1].

    ``centered``: subtract each sample's mean hidden state over its target and reference tokens first.
    """
    with torch.no_grad():
        if centered:
            dt = _score_dtype(tgt_feats.dtype)
            every = torch.cat([tgt_feats.to(dt)] + [r.to(dt) for r in ref_feats], dim=1)
            mean = every.mean(dim=1, keepdim=True)
            tgt_feats, ref_feats = tgt_feats.to(dt) - mean, [r.to(dt) - mean for r in ref_feats]
        pooled = pool_subjects(ref_feats, ref_masks)  # [B, K, D]
        for k, ok in enumerate(torch.isfinite(pooled).all(dim=2).all(dim=0).tolist()):
            if not ok:  # NaN/inf anywhere in a reference reaches its pooled vector (0 * NaN = NaN)
                raise ValueError(f"ref_feats[{k}] or ref_masks[{k}] contains NaN or inf values: check the "
                                 "model's tapped features / the reference mask")
        # S_k[n] = cos(T[n], r_k) = <T[n], r_k / |r_k|> / |T[n]|; no normalised copy of T is made
        tgt = tgt_feats.to(pooled.dtype)
        dots = torch.einsum("bnd,bkd->bkn", tgt, F.normalize(pooled, dim=-1))
        scores = dots / torch.linalg.vector_norm(tgt, dim=-1).clamp_min(1e-12)[:, None, :]
        if not torch.isfinite(scores).all():
            raise ValueError("tgt_feats contains NaN or inf values: check the model's tapped features")
    return scores


def claim_tokens(scores: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """SPAF's top-k rule (DESIGN 2.3 step 2): each subject claims its ``k_k`` best tokens; a token claimed by
    several subjects goes to the one with the highest score (ties: lowest subject index).

    Args:
        scores: ``[B, K, N]`` float, any readout (higher = more of subject k).
        top_k: one int, or ``[B, K]`` long (:func:`subject_top_k`).

    Returns:
        ``[B, K, N]`` bool, at most one True per (sample, token).
    """
    if scores.dim() != 3:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: expected [B, K, N]")
    _check_finite("scores", scores)
    b, k, n = scores.shape
    with torch.no_grad():
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand(b, k, n))
        kk = top_k if isinstance(top_k, torch.Tensor) else torch.full((b, k), top_k, device=scores.device)
        claimed = ranks < kk.to(scores.device)[..., None]  # M'_k before conflicts
        best = scores.masked_fill(~claimed, float("-inf")).argmax(dim=1)  # [B, N]
        owner = F.one_hot(best, k).permute(0, 2, 1).bool()
    return claimed & owner


READOUTS = ("attention", "cosine", "cosine_centered")


def readout_scores(readout: str, field: torch.Tensor | None, tgt_feats: torch.Tensor | None,
                   ref_feats: Sequence[torch.Tensor] | None, ref_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """SPAF scores ``S_k[n]`` ``[B, K, N]`` of one readout (module docstring).

    ``field``: ``[B, K, N]`` attention field (``FocusTap.field``), needed for ``attention``; ``tgt_feats`` and
    ``ref_feats``: tapped hidden states, needed for the cosine readouts; ``ref_masks``: K ``[B, M_k]``.
    """
    if readout == "attention":
        if field is None or field.dim() != 3 or field.shape[1] != len(ref_masks):
            got = None if field is None else tuple(field.shape)
            raise ValueError(f"focus.readout='attention' needs the attention field [B, K={len(ref_masks)}, N], "
                             f"got {got}: the backbone's tap did not return one")
        _check_finite("attention field", field)
        return field.float()
    if readout in ("cosine", "cosine_centered"):
        if tgt_feats is None or ref_feats is None:
            raise ValueError(f"focus.readout={readout!r} needs the tapped hidden states")
        _validate(tgt_feats, ref_feats, ref_masks, 0)
        return cosine_scores(tgt_feats, ref_feats, ref_masks, centered=readout == "cosine_centered")
    raise ValueError(f"focus.readout={readout!r} is invalid: allowed {', '.join(READOUTS)}")
