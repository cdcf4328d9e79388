"""SPAF (``match_subjects``, ``subject_top_k``): planted regions, mask respect, conflict rule, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from focusdpo.focus import match_subjects, pool_subjects, subject_top_k


def _planted(seed: int = 0, dtype: torch.dtype = torch.float32, noise: float = 0.3):
    """B=2, K=2, N=16 (4x4 grid), D=64. Subject k's target tokens = its pooled reference feature + noise;
    the other target tokens are unrelated random vectors. Returns feats, masks, planted regions [B, K, N]."""
    gen = torch.Generator().manual_seed(seed)
    b, n, d, m = 2, 16, 64, 9
    ref_feats = [torch.randn(b, m, d, generator=gen) for _ in range(2)]
    ref_masks = [(torch.rand(b, m, generator=gen) < 0.6).float() for _ in range(2)]
    for mask in ref_masks:
        mask[:, 0] = 1  # never empty
    pooled = [(f * mk[..., None]).sum(1) / mk.sum(1, keepdim=True) for f, mk in zip(ref_feats, ref_masks, strict=True)]
    regions = torch.zeros(b, 2, n, dtype=torch.bool)
    regions[0, 0, [0, 1, 4, 5]] = True
    regions[0, 1, [10, 11, 14]] = True
    regions[1, 0, [3, 7, 11, 15, 2]] = True
    regions[1, 1, [12, 13]] = True
    tgt = torch.randn(b, n, d, generator=gen) * pooled[0].norm(dim=-1).mean() / d**0.5
    for k in range(2):
        for bi in range(b):
            idx = regions[bi, k].nonzero()[:, 0]
            scale = pooled[k][bi].norm() / d**0.5
            tgt[bi, idx] = pooled[k][bi] + noise * scale * torch.randn(len(idx), d, generator=gen)
    return tgt.to(dtype), [f.to(dtype) for f in ref_feats], ref_masks, regions


def test_recovers_planted_regions_exactly() -> None:
    tgt, refs, masks, regions = _planted()
    top_k = regions.sum(-1)  # [B, K] long: exactly |P_k| tokens per subject
    matches, scores = match_subjects(tgt, refs, masks, top_k)
    assert matches.dtype == torch.bool and matches.shape == (2, 2, 16)
    assert torch.equal(matches, regions)
    assert scores.shape == (2, 2, 16) and scores.dtype == torch.float32
    assert scores.min() >= -1 - 1e-6 and scores.max() <= 1 + 1e-6


def test_scores_are_cosine_to_the_masked_mean() -> None:
    tgt, refs, masks, _ = _planted(seed=1)
    _, scores = match_subjects(tgt, refs, masks, 3)
    t = tgt.double().numpy()
    for k in range(2):
        f, mk = refs[k].double().numpy(), masks[k].double().numpy()
        for bi in range(2):
            r = (f[bi] * mk[bi][:, None]).sum(0) / mk[bi].sum()
            cos = t[bi] @ r / (np.linalg.norm(t[bi], axis=1) * np.linalg.norm(r))
            np.testing.assert_allclose(scores[bi, k].numpy(), cos, atol=1e-5)


def test_features_outside_the_reference_mask_do_not_matter() -> None:
    tgt, refs, masks, regions = _planted(seed=2)
    m1, s1 = match_subjects(tgt, refs, masks, regions.sum(-1))
    moved = [f.clone() for f in refs]
    for f, mk in zip(moved, masks, strict=True):
        f[mk == 0] = 1e3 * torch.randn_like(f[mk == 0])
    m2, s2 = match_subjects(tgt, moved, masks, regions.sum(-1))
    assert torch.equal(m1, m2)
    torch.testing.assert_close(s1, s2)
    # ...while features inside the mask do move the scores
    inside = [f.clone() for f in refs]
    inside[0][masks[0] == 1] += 5.0
    assert not torch.allclose(match_subjects(tgt, inside, masks, 4)[1], s1)


def test_top_k_per_subject_without_conflicts_takes_the_best_tokens() -> None:
    tgt, refs, masks, _ = _planted(seed=3)
    top_k = torch.tensor([[1, 2], [3, 1]])
    matches, scores = match_subjects(tgt, refs, masks, top_k)
    for bi in range(2):
        for k in range(2):
            best = set(scores[bi, k].topk(int(top_k[bi, k])).indices.tolist())
            got = set(matches[bi, k].nonzero()[:, 0].tolist())
            assert got <= best  # claimed tokens are among the subject's top-k
    # at most one owner per token
    assert matches.sum(dim=1).max() <= 1


def test_shared_claims_go_to_the_highest_score() -> None:
    tgt, refs, masks, _ = _planted(seed=4)
    matches, scores = match_subjects(tgt, refs, masks, 16)  # every subject claims every token
    want = torch.nn.functional.one_hot(scores.argmax(dim=1), 2).permute(0, 2, 1).bool()
    assert torch.equal(matches, want)
    # a token planted for subject 1 but closer to subject 2 goes to subject 2
    tgt2 = tgt.clone()
    pooled = pool_subjects(refs, masks)
    tgt2[0, 0] = pooled[0, 1] + 0.2 * pooled[0, 0]  # token 0 is in subject 0's planted region
    both_claim = torch.tensor([[16, 4], [1, 1]])  # subject 0 claims every token, subject 1 its best 4
    matches2, scores2 = match_subjects(tgt2, refs, masks, both_claim)
    assert scores2[0, 1, 0] > scores2[0, 0, 0]
    assert matches2[0, 1, 0] and not matches2[0, 0, 0]
    assert matches2[0, 0, [1, 4, 5]].all()  # the rest of subject 0's region stays with subject 0


def test_top_k_zero_claims_nothing_and_top_k_over_n_claims_all() -> None:
    tgt, refs, masks, _ = _planted(seed=5)
    assert not match_subjects(tgt, refs, masks, 0)[0].any()
    assert match_subjects(tgt, refs, masks, 100)[0].any(dim=1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_dtype(dtype: torch.dtype) -> None:
    tgt, refs, masks, regions = _planted(seed=6, dtype=dtype, noise=0.1)
    matches, scores = match_subjects(tgt, refs, masks, regions.sum(-1))
    assert torch.equal(matches, regions)
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_soft_reference_masks_weight_the_mean() -> None:
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[0.75, 0.25]])
    pooled = pool_subjects([feats], [mask])
    torch.testing.assert_close(pooled, torch.tensor([[[0.75, 0.25]]]))


def test_subject_top_k_known_values() -> None:
    regions = torch.zeros(1, 3, 2, 4)
    regions[0, 0, 0, :3] = 1.0  # |P| = 3
    regions[0, 1, 1, :] = torch.tensor([1.0, 1.0, 0.25, 0.25])  # |P| = 2.5
    regions[0, 2] = 1.0  # |P| = 8 = N
    assert subject_top_k(regions, 1.0).tolist() == [[3, 3, 8]]
    assert subject_top_k(regions, 0.5).tolist() == [[2, 2, 4]]
    assert subject_top_k(regions, 2.0).tolist() == [[6, 5, 8]]  # capped at N
    # area sums that round to just above an integer do not add a token
    tenth = torch.full((1, 1, 30), 0.1)
    assert subject_top_k(tenth, 1.0).tolist() == [[3]]


def test_subject_top_k_rejects_empty_regions() -> None:
    regions = torch.zeros(2, 2, 8)
    regions[:, 0, 0] = 1
    regions[0, 1, 1] = 1
    with pytest.raises(ValueError, match="subject 1 of sample 1 has an empty region"):
        subject_top_k(regions, 1.0)
    with pytest.raises(ValueError, match="rho=0"):
        subject_top_k(torch.ones(1, 1, 4), 0.0)


def test_bad_input_names_the_argument() -> None:
    tgt, refs, masks, _ = _planted(seed=7)
    empty = [masks[0], torch.zeros_like(masks[1])]
    with pytest.raises(ValueError, match=r"ref_masks\[1\] is empty"):
        match_subjects(tgt, refs, empty, 3)
    with pytest.raises(ValueError, match=r"ref_feats\[0\] has shape"):
        match_subjects(tgt, [refs[0][..., :10], refs[1]], masks, 3)
    with pytest.raises(ValueError, match=r"ref_masks\[1\]"):
        match_subjects(tgt, refs, [masks[0], masks[1][:, :4]], 3)
    nan_tgt = tgt.clone()
    nan_tgt[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="tgt_feats contains NaN"):
        match_subjects(nan_tgt, refs, masks, 3)
    with pytest.raises(ValueError, match="top_k has shape"):
        match_subjects(tgt, refs, masks, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k=-1"):
        match_subjects(tgt, refs, masks, -1)
    with pytest.raises(ValueError, match="tgt_feats has shape"):
        match_subjects(tgt[0], refs, masks, 3)
    with pytest.raises(ValueError, match="ref_feats"):
        match_subjects(tgt, refs, masks[:1], 3)


def test_readouts_planted_field_and_cosine() -> None:
    """``attention`` passes the field through; the cosine readouts score by hidden states; unknown names fail."""
    from focusdpo.focus import claim_tokens, readout_scores

    field = torch.zeros(1, 2, 6)
    field[0, 0, :2], field[0, 1, 3:5] = 0.4, 0.3
    scores = readout_scores("attention", field, None, None, [torch.ones(1, 3), torch.ones(1, 3)])
    matches = claim_tokens(scores, 2)
    assert matches[0, 0].nonzero().flatten().tolist() == [0, 1] and matches[0, 1].nonzero().flatten().tolist() == [3, 4]
    tgt = torch.zeros(1, 6, 4)
    tgt[0, :3, 0], tgt[0, 3:, 1] = 1.0, 1.0  # tokens 0-2 look like subject 0, 3-5 like subject 1
    tgt += 5.0  # a shared offset: plain cosine sees every token alike, the centered one does not
    refs = [torch.tensor([[[6.0, 5.0, 5.0, 5.0]]]), torch.tensor([[[5.0, 6.0, 5.0, 5.0]]])]
    masks = [torch.ones(1, 1), torch.ones(1, 1)]
    centered = readout_scores("cosine_centered", None, tgt, refs, masks)
    assert (centered[0, 0, :3] > centered[0, 1, :3]).all() and (centered[0, 1, 3:] > centered[0, 0, 3:]).all()
    plain = readout_scores("cosine", None, tgt, refs, masks)
    assert float(plain.min()) > 0.95  # the offset dominates
    with pytest.raises(ValueError, match="focus.readout='attention' needs the attention field"):
        readout_scores("attention", None, tgt, refs, masks)
    with pytest.raises(ValueError, match="focus.readout='dot' is invalid"):
        readout_scores("dot", field, tgt, refs, masks)
