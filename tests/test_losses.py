"""Losses: token errors, DPO with hand-computed values, the four objectives, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from focusdpo.losses import dpo_loss, needs_negative, needs_reference, objective_loss, token_errors, weighted_error


def test_token_errors_known_values() -> None:
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0], [3.0, -1.0]]])
    # token 0: (1 + 4) / 2 = 2.5; token 1: (9 + 1) / 2 = 5
    torch.testing.assert_close(token_errors(pred, target), torch.tensor([[2.5, 5.0]]))
    half = token_errors(pred.bfloat16(), target.bfloat16())
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="pred .* and target"):
        token_errors(pred, target[:, :1])


def test_weighted_error_known_values() -> None:
    err = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    torch.testing.assert_close(weighted_error(err), torch.tensor([3.0]))
    # E = (0.5*1 + 0.5*2 + 1*3 + 2*6) / 4 = 16.5 / 4
    torch.testing.assert_close(weighted_error(err, torch.tensor([[0.5, 0.5, 1.0, 2.0]])), torch.tensor([4.125]))
    assert torch.equal(weighted_error(err, torch.ones_like(err)), weighted_error(err))
    with pytest.raises(ValueError, match="weights has shape"):
        weighted_error(err, torch.ones(1, 3))


def test_dpo_loss_hand_computed() -> None:
    """Sample 0 (beta = 2): inside = -(2/2)[(0.3 - 0.5) - (0.6 - 0.4)] = 0.4, loss = log(1 + e^-0.4) = 0.513015.
    Sample 1 (same beta): inside = -(2/2)[(0.5 - 0.4) - (0.2 - 0.3)] = -0.2, loss = log(1 + e^0.2) = 0.798139."""
    loss, m = dpo_loss(torch.tensor([0.3, 0.5]), torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.4]),
                       torch.tensor([0.4, 0.3]), beta=2.0)
    torch.testing.assert_close(loss, torch.tensor([0.5130153, math.log1p(math.exp(0.2))]))
    assert loss[1].item() == pytest.approx(0.798139, abs=1e-6)
    assert m["implicit_acc"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(m["margin"], torch.tensor([0.4, -0.2]))
    torch.testing.assert_close(m["loss"], loss)
    assert set(m) == {"loss", "implicit_acc", "margin", "err_w", "err_l", "ref_err_w", "ref_err_l"}
    # policy equal to the reference: inside = 0, loss = log 2, and a tie is not counted as correct
    same, m0 = dpo_loss(torch.tensor([0.3]), torch.tensor([0.6]), torch.tensor([0.3]), torch.tensor([0.6]), 5.0)
    torch.testing.assert_close(same, torch.tensor([math.log(2)]))
    assert m0["implicit_acc"].tolist() == [0.0]


def _errors(seed: int, b: int = 3, n: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(b, n, generator=gen, dtype=torch.float64) for _ in range(4)]


def test_w_one_is_plain_diffusion_dpo() -> None:
    pol_w, pol_l, ref_w, ref_l = _errors(0)
    beta = 7.0
    # Diffusion-DPO (Wallace et al.), per-pair MSE over all token channels
    mse = [e.mean(dim=1) for e in (pol_w, pol_l, ref_w, ref_l)]
    want = -F.logsigmoid(-0.5 * beta * ((mse[0] - mse[2]) - (mse[1] - mse[3])))
    dpo, _ = objective_loss("dpo", pol_w, pol_l, ref_w, ref_l, beta=beta)
    focus, _ = objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=torch.ones_like(pol_w), beta=beta)
    torch.testing.assert_close(dpo, want, rtol=0, atol=1e-15)
    assert torch.equal(focus, dpo)


def test_weights_change_the_loss_where_they_should() -> None:
    pol_w, pol_l, ref_w, ref_l = _errors(1, b=1, n=4)
    weights = torch.tensor([[2.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    loss, m = objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=weights, beta=3.0)
    e = [(weights * x).sum() / 4 for x in (pol_w, pol_l, ref_w, ref_l)]
    torch.testing.assert_close(loss, -F.logsigmoid(-1.5 * ((e[0] - e[2]) - (e[1] - e[3]))).view(1))
    torch.testing.assert_close(m["err_w"], e[0].view(1))
    # a pair (W_w, W_l) weighs each side with its own map
    other = torch.flip(weights, dims=[1])
    _, m2 = objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=(weights, other), beta=3.0)
    torch.testing.assert_close(m2["err_l"], weighted_error(pol_l, other))
    torch.testing.assert_close(m2["ref_err_l"], weighted_error(ref_l, other))


def test_lower_policy_error_on_positive_lowers_loss() -> None:
    pol_w, pol_l, ref_w, ref_l = _errors(2)
    weights = _errors(12)[0] + 0.5
    losses = [objective_loss("focusdpo", pol_w * s, pol_l, ref_w, ref_l, weights=weights, beta=4.0)[0]
              for s in (1.0, 0.8, 0.5)]
    assert (losses[1] < losses[0]).all() and (losses[2] < losses[1]).all()
    # and raising the error on the negative lowers it too
    higher_l, _ = objective_loss("dpo", pol_w, pol_l * 1.5, ref_w, ref_l, beta=4.0)
    assert (higher_l < objective_loss("dpo", pol_w, pol_l, ref_w, ref_l, beta=4.0)[0]).all()


def test_gradients_flow_through_policy_errors_only() -> None:
    pol_w, pol_l, ref_w, ref_l = (e.clone().requires_grad_() for e in _errors(3))
    weights = (_errors(13)[0] + 0.5).requires_grad_()
    loss, metrics = objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=weights, beta=2.0,
                                   lambda_sft=0.1)
    loss.sum().backward()
    assert ref_w.grad is None and ref_l.grad is None and weights.grad is None
    assert (pol_w.grad > 0).all() and (pol_l.grad < 0).all()  # descent lowers E(x^w), raises E(x^l)
    assert not any(v.requires_grad for v in metrics.values())
    # dpo_loss on its own also treats the reference errors as constants
    errs = [e[:, 0].detach().clone().requires_grad_() for e in (pol_w, pol_l, ref_w, ref_l)]
    dpo_loss(*errs, beta=2.0)[0].sum().backward()
    assert errs[2].grad is None and errs[3].grad is None and errs[0].grad is not None


def test_lambda_sft_adds_the_weighted_positive_error() -> None:
    pol_w, pol_l, ref_w, ref_l = _errors(4)
    w = _errors(14)[0] + 0.5
    base, _ = objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=w, beta=2.0)
    with_sft, m = objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=w, beta=2.0, lambda_sft=0.3)
    torch.testing.assert_close(with_sft - base, 0.3 * weighted_error(pol_w, w))
    torch.testing.assert_close(m["sft"], 0.3 * weighted_error(pol_w, w))


def test_sft_is_the_positive_regression() -> None:
    pol_w = _errors(5)[0]
    loss, m = objective_loss("sft", pol_w)
    torch.testing.assert_close(loss, pol_w.mean(dim=1))
    assert set(m) == {"loss", "err_w"}


def test_patchdpo_hand_computed() -> None:
    """m = [1, .5, 0, 0], alpha = 1: W_p = [2, 1.5, 1, 1] / 1.375; E_w = (0.4 + 0.6 + 0.1 + 0.3) / 5.5 = 0.254545;
    negatives only where m = 0: E_l = (0.5 + 0.7) / 4 = 0.3; loss = 0.554545."""
    pol_w = torch.tensor([[0.2, 0.4, 0.1, 0.3]], dtype=torch.float64, requires_grad=True)
    pol_l = torch.tensor([[0.9, 0.8, 0.5, 0.7]], dtype=torch.float64, requires_grad=True)
    m_prior = torch.tensor([[1.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    loss, m = objective_loss("patchdpo", pol_w, pol_l, m_prior_tok=m_prior)
    torch.testing.assert_close(loss.detach(), torch.tensor([1.4 / 5.5 + 0.3], dtype=torch.float64))
    torch.testing.assert_close(m["err_l"], torch.tensor([0.3], dtype=torch.float64))
    loss.sum().backward()
    assert pol_l.grad[0, :2].eq(0).all() and pol_l.grad[0, 2:].gt(0).all()  # negatives: outside M_prior only
    assert pol_w.grad[0, 0] > pol_w.grad[0, 1] > pol_w.grad[0, 2]  # positives: weighted up inside M_prior
    # alpha = 0: plain regression on positives plus outside-only negatives
    flat, _ = objective_loss("patchdpo", pol_w, pol_l, m_prior_tok=m_prior, patch_alpha=0.0)
    torch.testing.assert_close(flat.detach(), torch.tensor([0.25 + 0.3], dtype=torch.float64))


def test_requirements_table() -> None:
    assert [needs_reference(n) for n in ("sft", "dpo", "patchdpo", "focusdpo")] == [False, True, False, True]
    assert [needs_negative(n) for n in ("sft", "dpo", "patchdpo", "focusdpo")] == [False, True, True, True]


@pytest.mark.parametrize("fn", [needs_reference, needs_negative])
def test_unknown_objective_is_rejected(fn) -> None:
    with pytest.raises(ValueError, match="objective 'ipo' is unknown: allowed sft, dpo, patchdpo, focusdpo"):
        fn("ipo")
    with pytest.raises(ValueError, match="objective 'DPO' is unknown"):
        objective_loss("DPO", torch.zeros(1, 4))


def test_missing_or_bad_inputs_name_the_argument() -> None:
    pol_w, pol_l, ref_w, ref_l = _errors(6)
    with pytest.raises(ValueError, match="ref_l is None but objective 'dpo' needs it"):
        objective_loss("dpo", pol_w, pol_l, ref_w, None, beta=1.0)
    with pytest.raises(ValueError, match="weights is None but objective 'focusdpo' needs it"):
        objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, beta=1.0)
    with pytest.raises(ValueError, match="m_prior_tok is None but objective 'patchdpo'"):
        objective_loss("patchdpo", pol_w, pol_l)
    with pytest.raises(ValueError, match="weights were given to objective 'dpo'"):
        objective_loss("dpo", pol_w, pol_l, ref_w, ref_l, weights=torch.ones_like(pol_w), beta=1.0)
    with pytest.raises(ValueError, match="weights has negative entries"):
        objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=pol_w - 0.5, beta=1.0)
    with pytest.raises(ValueError, match="beta is None"):
        objective_loss("dpo", pol_w, pol_l, ref_w, ref_l)
    with pytest.raises(ValueError, match=r"pol_l has shape \(3, 8\)"):
        objective_loss("dpo", pol_w, pol_l[:, :8], ref_w, ref_l, beta=1.0)
    nan = ref_w.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="ref_w contains NaN"):
        objective_loss("dpo", pol_w, pol_l, nan, ref_l, beta=1.0)
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(pol_w[:, 0], pol_l[:, 0], ref_w[:, 0], ref_l[:, 0], beta=0.0)
    with pytest.raises(ValueError, match=r"ref_err_l has shape \(2,\)"):
        dpo_loss(pol_w[:, 0], pol_l[:, 0], ref_w[:, 0], ref_l[:2, 0], beta=1.0)
    inf = pol_w[:, 0].clone()
    inf[0] = float("inf")
    with pytest.raises(ValueError, match="err_w contains NaN or inf"):
        dpo_loss(inf, pol_l[:, 0], ref_w[:, 0], ref_l[:, 0], beta=1.0)


def test_prior_weight_metrics() -> None:
    pol_w, pol_l, ref_w, ref_l = _errors(7, b=1, n=4)
    m_prior = torch.tensor([[1.0, 0.6, 0.2, 0.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, 1.0, 0.5, 0.5]], dtype=torch.float64)
    _, m = objective_loss("focusdpo", pol_w, pol_l, ref_w, ref_l, weights=w, m_prior_tok=m_prior, beta=1.0)
    assert m["w_in_prior"].tolist() == pytest.approx([1.5]) and m["w_out_prior"].tolist() == pytest.approx([0.5])
    _, m_dpo = objective_loss("dpo", pol_w, pol_l, ref_w, ref_l, m_prior_tok=m_prior, beta=1.0)
    assert m_dpo["w_in_prior"].tolist() == [1.0] and m_dpo["w_out_prior"].tolist() == [1.0]
