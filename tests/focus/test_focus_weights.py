"""Focus weights (DESIGN 2.5): hand-built sets and weights on a 4x4 grid, invariants, switches, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from focusdpo.config import FocusConfig
from focusdpo.focus import focus_sets, focus_weights
from focusdpo.focus.weights import normalise_floor

# 4x4 token grid, token n = 4 * row + col.
#   subject 0 region: tokens 0, 1, 4, 5 (full), 8 (half covered: member), 2 (quarter: not a member)
#   subject 1 region: tokens 10, 11, 14, 15 (full), 6 (0.49: not a member)
#   subject 0 claims 0, 1, 4 and 2; subject 1 claims 10, 11, 14, 3 and 5 (5 lies in subject 0's region).
# Hand-built sets: U = {0,1,4,5,8,10,11,14,15}; A = {0,1,4,10,11,14}; M_s = {5 (leak), 8, 15 (unmatched)};
# a = 6 / 9.


def _grid_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    regions = torch.zeros(1, 2, 16, dtype=torch.float64)
    regions[0, 0, [0, 1, 4, 5]] = 1.0
    regions[0, 0, 8] = 0.5
    regions[0, 0, 2] = 0.25
    regions[0, 1, [10, 11, 14, 15]] = 1.0
    regions[0, 1, 6] = 0.49
    matches = torch.zeros(1, 2, 16, dtype=torch.bool)
    matches[0, 0, [0, 1, 4, 2]] = True
    matches[0, 1, [10, 11, 14, 3, 5]] = True
    m_d = torch.full((1, 16), 0.5, dtype=torch.float64)
    m_d[0, 5] = 1.0
    m_d[0, 3] = 0.8  # outside every region: must be ignored
    return matches, regions, m_d


def _tokens(mask: torch.Tensor) -> list[int]:
    return mask[0].nonzero()[:, 0].tolist()


def test_sets_match_the_hand_built_grid() -> None:
    matches, regions, _ = _grid_case()
    sets = focus_sets(matches, regions)
    assert _tokens(sets["union"]) == [0, 1, 4, 5, 8, 10, 11, 14, 15]
    assert _tokens(sets["aligned"]) == [0, 1, 4, 10, 11, 14]
    assert _tokens(sets["confused"]) == [5, 8, 15]
    assert sets["a"].tolist() == pytest.approx([6 / 9])


def test_weights_match_hand_computation_gate_on() -> None:
    matches, regions, m_d = _grid_case()
    w, stats = focus_weights(matches, regions, m_d, FocusConfig(tau=0.5))  # a = 2/3 >= tau = 0.5: gate on
    # W_raw = 1 + 2 M_s - 0.5 A + 1 * M_d * U:
    #   A tokens 1 - 0.5 + 0.5 = 1; token 5: 1 + 2 + 1 = 4; tokens 8, 15: 1 + 2 + 0.5 = 3.5; others 1.
    #   sum = 6 + 4 + 3.5 + 3.5 + 7 = 24, mean 1.5
    raw = torch.ones(1, 16, dtype=torch.float64)
    raw[0, 5], raw[0, 8], raw[0, 15] = 4.0, 3.5, 3.5
    torch.testing.assert_close(w, raw / 1.5)
    assert w.dtype == torch.float64
    assert stats["gate"].tolist() == [1.0]
    assert stats["n_aligned"].tolist() == [6.0] and stats["n_confused"].tolist() == [3.0]
    assert stats["n_subject"].tolist() == [9.0]
    assert stats["w_in"].tolist() == pytest.approx([17 / 9 / 1.5])
    assert stats["w_out"].tolist() == pytest.approx([1 / 1.5])


def test_weights_match_hand_computation_gate_off() -> None:
    matches, regions, m_d = _grid_case()
    cfg = FocusConfig(tau=0.7)  # a = 2/3 < 0.7: detail term off
    w, stats = focus_weights(matches, regions, m_d, cfg)
    # A tokens 0.5, M_s tokens 3, others 1: sum = 3 + 9 + 7 = 19
    raw = torch.ones(1, 16, dtype=torch.float64)
    raw[0, [0, 1, 4, 10, 11, 14]] = 0.5
    raw[0, [5, 8, 15]] = 3.0
    torch.testing.assert_close(w, raw * 16 / 19)
    assert stats["gate"].tolist() == [0.0]
    # dynamic: false keeps the detail term whatever a is
    w_always, stats_always = focus_weights(matches, regions, m_d, dataclasses.replace(cfg, dynamic=False))
    assert stats_always["gate"].tolist() == [1.0]
    torch.testing.assert_close(w_always, focus_weights(matches, regions, m_d, FocusConfig(tau=0.5))[0])


def test_gate_threshold_is_inclusive() -> None:
    matches, regions, m_d = _grid_case()
    assert focus_weights(matches, regions, m_d, FocusConfig(tau=6 / 9))[1]["gate"].tolist() == [1.0]


def _random_case(seed: int, b: int = 4, k: int = 3, n: int = 64):
    gen = torch.Generator().manual_seed(seed)
    regions = (torch.rand(b, k, n, generator=gen) < 0.2).float() * torch.rand(b, k, n, generator=gen).add(0.3)
    regions = regions.clamp(max=1.0)
    regions[:, :, 0] = 1.0  # every subject non-empty
    matches = torch.rand(b, k, n, generator=gen) < 0.3
    m_d = torch.rand(b, n, generator=gen)
    return matches, regions, m_d


def test_all_parts_off_gives_exactly_ones() -> None:
    matches, regions, m_d = _random_case(0)
    cfg = FocusConfig(spaf=False, dpce=False, dynamic=False)
    for args in ((matches, regions, m_d), (None, regions, None)):
        w, _ = focus_weights(*args, cfg)
        assert torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("seed", range(6))
def test_mean_one_and_floor_hold_for_any_config(seed: int) -> None:
    matches, regions, m_d = _random_case(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    alphas = torch.rand(3, generator=gen) * torch.tensor([10.0, 0.99, 5.0])
    cfg = FocusConfig(alpha_s=float(alphas[0]), alpha_a=float(alphas[1]), alpha_d=float(alphas[2]),
                      w_min=0.3 * seed / 5, tau=float(torch.rand(1, generator=gen)))
    w, stats = focus_weights(matches, regions, m_d, cfg)
    torch.testing.assert_close(w.mean(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    assert w.min() >= cfg.w_min - 1e-6
    assert torch.equal(stats["gate"].bool(), stats["a"] >= cfg.tau)


def test_floor_holds_where_plain_division_would_break_it() -> None:
    # 63 confused tokens at W_raw = 1 + 10 = 11 and one aligned token clamped at w_min = 0.3:
    # plain division gives 0.3 / mean(W_raw) = 0.028 < w_min, so the floor must be enforced after normalising.
    regions = torch.ones(1, 1, 64)
    matches = torch.zeros(1, 1, 64, dtype=torch.bool)
    matches[0, 0, 0] = True
    cfg = FocusConfig(alpha_s=10.0, alpha_a=0.9, dpce=False, w_min=0.3)
    w, _ = focus_weights(matches, regions, None, cfg)
    assert w[0, 0].item() == pytest.approx(0.3)
    torch.testing.assert_close(w[0, 1:], torch.full((63,), (64 - 0.3) / 63))
    torch.testing.assert_close(normalise_floor(torch.tensor([[0.3, 11.0, 11.0]]), 0.3),
                               torch.tensor([[0.3, 1.35, 1.35]]))


def test_spaf_off_keeps_only_the_detail_term() -> None:
    matches, regions, m_d = _grid_case()
    w, stats = focus_weights(None, regions, m_d, FocusConfig(spaf=False, dynamic=False))
    union = (regions >= 0.5).any(dim=1).double()
    raw = 1 + m_d * union
    torch.testing.assert_close(w, raw / raw.mean(dim=1, keepdim=True))
    assert torch.isnan(stats["a"]).all()  # no SPAF, alignment unknown
    # with matches given, spaf=false still lets the gate use a
    w2, stats2 = focus_weights(matches, regions, m_d, FocusConfig(spaf=False, tau=0.9))
    assert stats2["gate"].tolist() == [0.0] and torch.equal(w2, torch.ones_like(w2))


def test_dpce_off_drops_the_detail_term() -> None:
    matches, regions, _ = _grid_case()
    w, _ = focus_weights(matches, regions, None, FocusConfig(dpce=False))
    w_gate_off, _ = focus_weights(matches, regions, torch.zeros(1, 16, dtype=torch.float64), FocusConfig(tau=1.0))
    torch.testing.assert_close(w, w_gate_off)


def test_ref_complexity_scales_each_subjects_terms() -> None:
    matches, regions, m_d = _grid_case()
    cfg = FocusConfig(ref_complexity_scale=2.0, tau=0.7)  # gate off: terms are -0.5 A and +2 M_s
    w, _ = focus_weights(matches, regions, m_d, cfg, ref_complexity=torch.tensor([[0.25, 0.0]]))
    # subject 0's tokens get factor 1 + 2 * 0.25 = 1.5, subject 1's factor 1
    raw = torch.ones(1, 16, dtype=torch.float64)
    raw[0, [0, 1, 4]] = 1 - 1.5 * 0.5
    raw[0, [10, 11, 14]] = 0.5
    raw[0, [5, 8]] = 1 + 1.5 * 2.0
    raw[0, 15] = 3.0
    torch.testing.assert_close(w, raw / raw.mean())
    with pytest.raises(ValueError, match="ref_complexity is None"):
        focus_weights(matches, regions, m_d, cfg)


def test_weights_are_constants_for_autograd() -> None:
    matches, regions, m_d = _random_case(1)
    w, _ = focus_weights(matches, regions, m_d.requires_grad_(), FocusConfig())
    assert not w.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_follows_regions(dtype: torch.dtype) -> None:
    matches, regions, m_d = _grid_case()
    w, _ = focus_weights(matches, regions.to(dtype), m_d.to(dtype), FocusConfig())
    assert w.dtype == dtype
    torch.testing.assert_close(w.double(), focus_weights(matches, regions, m_d, FocusConfig())[0],
                               atol=2e-2, rtol=0)
    # built in float32, then rounded: the mean stays 1 to the dtype's precision even over many tokens
    big = torch.ones(1, 1, 4096, dtype=dtype)
    big_matches = torch.zeros(1, 1, 4096, dtype=torch.bool)
    big_matches[0, 0, :1000] = True
    w_big, _ = focus_weights(big_matches, big, torch.rand(1, 4096).to(dtype), FocusConfig())
    assert abs(w_big.double().mean().item() - 1) < 4e-3


def test_bad_input_names_the_argument() -> None:
    matches, regions, m_d = _grid_case()
    cfg = FocusConfig()
    with pytest.raises(ValueError, match="matches has shape"):
        focus_weights(matches[:, :1], regions, m_d, cfg)
    with pytest.raises(ValueError, match="m_d has shape"):
        focus_weights(matches, regions, m_d[:, :8], cfg)
    bad = m_d.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="m_d has shape .*NaN"):
        focus_weights(matches, regions, bad, cfg)
    empty = regions.clone()
    empty[0, 1] = 0
    with pytest.raises(ValueError, match="subject 1 of sample 0 has an empty region"):
        focus_weights(matches, empty, m_d, cfg)
    with pytest.raises(ValueError, match="matches is None"):
        focus_weights(None, regions, m_d, cfg)
    with pytest.raises(ValueError, match="m_d is None"):
        focus_weights(matches, regions, None, cfg)
    with pytest.raises(ValueError, match="regions has values outside"):
        focus_weights(matches, regions * 2, m_d, cfg)
    with pytest.raises(ValueError, match="regions has shape"):
        focus_weights(matches, regions[0], m_d, cfg)
