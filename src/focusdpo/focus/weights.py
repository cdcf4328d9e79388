"""Dynamic focus weights (DESIGN 2.5): SPAF sets and DPCE details combined into per-token loss weights.

Sets at token resolution (all ``[B, N]`` bool):

- ``P_k = regions[:, k] >= 0.5``: regions arrive as area fractions (``pool_to_tokens``) and a token belongs
  to subject ``k`` when at least half of its pixels do. ``U = union_k P_k``.
- ``A = union_k (M'_k ∩ P_k)``: tokens where the model already puts the subject that belongs there (aligned).
- ``M_s = U \\ A``: subject tokens matched by another subject or by none (confused or unmatched).
- ``a = |A| / |U|`` per sample. A sample with no subject token (``U`` empty, e.g. every subject smaller than
  half a token) has ``a = 0``, and its detail term is empty anyway since ``M_d`` is kept inside ``U``.

Weights: ``W_raw = 1 + alpha_s M_s - alpha_a A + g alpha_d (M_d * U)``, ``g = [a >= tau]`` (``g = 1`` when
``cfg.dynamic`` is false), clamped at ``w_min`` and divided by its mean per sample so ``mean_n W = 1``.
Deviation: where that division would push tokens below ``w_min`` (only possible with non-default alphas,
``min W_raw / mean W_raw < w_min``), those tokens are held at ``w_min`` and the others rescaled so the mean
stays 1 (``normalise_floor``); the design's two promises, mean 1 and ``W >= w_min``, then both hold.
``cfg.spaf = false`` drops the ``M_s`` and ``A`` terms, ``cfg.dpce = false`` drops the detail term; with every
term dropped ``W`` is exactly 1 (bit for bit), which reproduces plain Diffusion-DPO.

``cfg.ref_complexity_scale`` (``c``, default 0) scales subject ``k``'s terms by ``1 + c * ref_complexity[k]``:
the bonus/malus terms of a token in ``P_k`` are multiplied by that factor (a token in several regions takes
the largest factor). It needs ``ref_complexity [B, K]`` (e.g. the mean ``complexity_map`` of each reference).

``W`` and every statistic are constants for autograd (computed under ``no_grad``).
"""

from __future__ import annotations

import torch

from focusdpo.config import FocusConfig

_MEMBERSHIP = 0.5


def _validate(matches: torch.Tensor | None, regions: torch.Tensor, m_d: torch.Tensor | None,
              cfg: FocusConfig, ref_complexity: torch.Tensor | None) -> None:
    if regions.dim() != 3 or not regions.is_floating_point():
        raise ValueError(f"regions has shape {tuple(regions.shape)} and dtype {regions.dtype}: expected "
                         "float [B, K, N] area fractions in [0, 1] (flatten [B, K, h, w] with .flatten(2))")
    b, k, n = regions.shape
    if not torch.isfinite(regions).all() or (regions < 0).any() or (regions > 1).any():
        raise ValueError("regions has values outside [0, 1] or NaN: expected area fractions from pool_to_tokens")
    empty = (regions.sum(dim=-1) <= 0).nonzero()
    if len(empty):
        bi, ki = empty[0].tolist()
        raise ValueError(f"regions: subject {ki} of sample {bi} has an empty region P_k (drop or fix the record)")
    if matches is None:
        if cfg.spaf or (cfg.dpce and cfg.dynamic):
            raise ValueError("matches is None but focus.spaf or the dynamic detail gate needs SPAF matches: pass "
                             "match_subjects(...)[0] or set focus.spaf=false and focus.dynamic=false")
    elif matches.shape != (b, k, n) or matches.dtype != torch.bool:
        raise ValueError(f"matches has shape {tuple(matches.shape)} and dtype {matches.dtype}: expected bool "
                         f"[B={b}, K={k}, N={n}] like regions")
    if m_d is None:
        if cfg.dpce:
            raise ValueError("m_d is None but focus.dpce=true: pass the record's DPCE map flattened to [B, N] "
                             "or set focus.dpce=false")
    elif m_d.shape != (b, n) or not torch.isfinite(m_d).all() or (m_d < 0).any() or (m_d > 1).any():
        raise ValueError(f"m_d has shape {tuple(m_d.shape)} or values outside [0, 1]/NaN: expected [B={b}, N={n}] "
                         "in [0, 1] (flatten [B, h, w] with .flatten(1))")
    if cfg.ref_complexity_scale > 0 and (ref_complexity is None or ref_complexity.shape != (b, k)):
        got = None if ref_complexity is None else tuple(ref_complexity.shape)
        raise ValueError(f"ref_complexity is {got}: focus.ref_complexity_scale > 0 needs it as [B={b}, K={k}] "
                         "in [0, 1]; pass it or set focus.ref_complexity_scale=0")


def _subject_factor(member: torch.Tensor, ref_complexity: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, N]`` factor ``1 + scale * max_{k: n in P_k} c_k`` (1 outside every region)."""
    c = ref_complexity.to(member.device, torch.float64 if ref_complexity.dtype == torch.float64 else torch.float32)
    per_subject = member.to(c.dtype) * c[..., None]  # [B, K, N]
    return 1 + scale * per_subject.amax(dim=1)


def focus_sets(matches: torch.Tensor, regions: torch.Tensor) -> dict[str, torch.Tensor]:
    """SPAF sets (DESIGN 2.3 steps 5-6) from matches ``[B, K, N]`` bool and regions ``[B, K, N]`` fractions.

    Returns ``{"member": P [B, K, N] bool, "union": U [B, N] bool, "aligned": A [B, N] bool,
    "confused": M_s [B, N] bool, "a": [B] float32 in [0, 1]}``.
    """
    member = regions >= _MEMBERSHIP
    union = member.any(dim=1)
    aligned = (matches & member).any(dim=1)  # A = union_k (M'_k ∩ P_k)
    confused = union & ~aligned  # M_s = (union_k P_k) \ A
    n_union = union.sum(dim=1).float()
    a = aligned.sum(dim=1).float() / n_union.clamp_min(1)
    return {"member": member, "union": union, "aligned": aligned, "confused": confused, "a": a}


def focus_weights(matches: torch.Tensor | None, regions: torch.Tensor, m_d: torch.Tensor | None,
                  cfg: FocusConfig, ref_complexity: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token focus weights ``W`` of the FocusDPO loss (DESIGN 2.5).

    Args:
        matches: ``[B, K, N]`` bool SPAF matches (``match_subjects(...)[0]``); may be None only when
            ``cfg.spaf`` is false and the detail gate does not need ``a`` (``dpce`` or ``dynamic`` false).
        regions: ``[B, K, N]`` float in ``[0, 1]``, area-pooled subject regions ``P_k`` of the positive.
        m_d: ``[B, N]`` float in ``[0, 1]``, the DPCE map of the positive; None allowed when ``cfg.dpce`` is false.
        cfg: the focus config (alphas, ``tau``, ``w_min``, switches ``spaf``/``dpce``/``dynamic``).
        ref_complexity: ``[B, K]`` in ``[0, 1]``, needed only when ``cfg.ref_complexity_scale > 0``.

    Returns:
        ``W`` ``[B, N]`` in ``regions``' dtype (computed in float32 or float64), ``>= w_min``, mean 1 per
        sample up to rounding (exactly 1 everywhere when every term is off), and
        stats, each ``[B]`` float32: ``a``, ``gate`` (0/1), ``n_subject`` (``|U|``), ``n_aligned`` (``|A|``),
        ``n_confused`` (``|M_s|``), ``w_in`` / ``w_out`` (mean ``W`` inside / outside ``U``; NaN when empty).
    """
    _validate(matches, regions, m_d, cfg, ref_complexity)
    with torch.no_grad():
        # half/bfloat16 weights are built in float32: a bfloat16 sum over N tokens is off by whole units
        dt = torch.float64 if regions.dtype == torch.float64 else torch.float32
        no_matches = matches is None
        if no_matches:
            matches = torch.zeros(regions.shape, dtype=torch.bool, device=regions.device)
        sets = focus_sets(matches, regions)
        if no_matches:  # no SPAF: alignment unknown, reported as NaN (the gate is not used then)
            sets["a"] = torch.full_like(sets["a"], float("nan"))
        union = sets["union"]
        if cfg.dynamic and not no_matches:
            gate = sets["a"] >= cfg.tau  # g = 1 when a >= tau
        else:
            gate = torch.ones_like(sets["a"], dtype=torch.bool)
        factor = 1.0
        if cfg.ref_complexity_scale > 0:
            factor = _subject_factor(sets["member"], ref_complexity, cfg.ref_complexity_scale).to(dt)
        terms = torch.zeros(union.shape, dtype=dt, device=regions.device)
        if cfg.spaf:
            # + alpha_s * M_s - alpha_a * A
            terms = terms + cfg.alpha_s * sets["confused"].to(dt) - cfg.alpha_a * sets["aligned"].to(dt)
        if cfg.dpce:
            # + g * alpha_d * M_d, with M_d kept inside union_k P_k
            terms = terms + cfg.alpha_d * gate.to(dt)[:, None] * (m_d.to(dt) * union.to(dt))
        # W_raw = 1 + terms, clamped at w_min, then W = W_raw / mean(W_raw) (floor kept, see normalise_floor)
        w_raw = (1 + factor * terms).clamp_min(cfg.w_min)
        w = normalise_floor(w_raw, cfg.w_min)
        stats = _stats(w, sets, gate)
    return w.to(regions.dtype), stats


def normalise_floor(w_raw: torch.Tensor, w_min: float) -> torch.Tensor:
    """``W = max(w_min, c * W_raw)`` per sample with ``c > 0`` such that ``mean_n W = 1``.

    When ``min(W_raw) / mean(W_raw) >= w_min`` (always with the default alphas) this is exactly
    ``W_raw / mean(W_raw)``; otherwise plain division would push floor tokens below ``w_min``, and the
    tokens under the floor are held at it while the rest share the remaining mass. Solved exactly with one
    sort: if the ``j`` smallest tokens sit at the floor, ``c_j = (N - j w_min) / sum_{i >= j} v_i`` (``v``
    sorted ascending), and the answer is the smallest ``j`` with ``c_j v_j >= w_min`` (it exists for
    ``w_min <= 1``: ``j = N - 1`` satisfies it).

    Args:
        w_raw: ``[B, N]`` raw weights ``>= w_min``, not all 0 in a sample.
        w_min: floor in ``[0, 1]``.

    Returns:
        ``[B, N]`` weights ``>= w_min`` with mean 1 per sample (up to rounding).
    """
    if not 0 <= w_min <= 1:
        raise ValueError(f"w_min={w_min!r} is invalid: expected [0, 1] (the weights have mean 1)")
    if (w_raw.sum(dim=1) <= 0).any():
        raise ValueError("focus weights are all 0 in a sample (focus.w_min=0 with focus.alpha_a >= 1 on a "
                         "fully aligned sample): set focus.w_min > 0 or focus.alpha_a < 1")
    n = w_raw.shape[1]
    v = torch.sort(w_raw, dim=1).values
    suffix = v.flip(1).cumsum(dim=1).flip(1)  # S_j = sum_{i >= j} v_i
    j = torch.arange(n, device=w_raw.device, dtype=w_raw.dtype)
    c = (n - j * w_min) / suffix
    first = (c * v >= w_min).to(torch.uint8).argmax(dim=1, keepdim=True)  # smallest valid j
    return (c.gather(1, first) * w_raw).clamp_min(w_min)


def _masked_mean(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum(dim=1).float()
    total = (w.float() * mask.float()).sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def _stats(w: torch.Tensor, sets: dict[str, torch.Tensor], gate: torch.Tensor) -> dict[str, torch.Tensor]:
    union = sets["union"]
    return {
        "a": sets["a"],
        "gate": gate.float(),
        "n_subject": union.sum(dim=1).float(),
        "n_aligned": sets["aligned"].sum(dim=1).float(),
        "n_confused": sets["confused"].sum(dim=1).float(),
        "w_in": _masked_mean(w, union),
        "w_out": _masked_mean(w, ~union),
    }
