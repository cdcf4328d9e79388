"""The objective registry: the built-ins' flags, its errors, and a new objective that is one registration (made
here, in the test) which the config validation and the training step then use with no other change."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import tiny_config

from focusdpo.backbones import load_backbone
from focusdpo.compare import resolve_variants
from focusdpo.config import ConfigError
from focusdpo.data import ensure_toy_dip
from focusdpo.data.dataset import DipDataset
from focusdpo.losses import objective_loss, weighted_error
from focusdpo.objectives import _REGISTRY, Objective, get_objective, objective_names, register_objective
from focusdpo.train.step import NoiseKey, pair_step
from focusdpo.train.trainer import validation_batch


def test_builtins_and_their_needs() -> None:
    assert objective_names()[:4] == ("sft", "dpo", "patchdpo", "focusdpo")
    flags = {n: (o.needs_reference, o.needs_negative, o.uses_focus) for n in objective_names()[:4]
             for o in [get_objective(n)]}
    assert flags == {"sft": (False, False, False), "dpo": (True, True, False), "patchdpo": (False, True, False),
                     "focusdpo": (True, True, True)}


def test_registry_errors_name_the_objective() -> None:
    with pytest.raises(ValueError, match="'ipo' is unknown: allowed sft, dpo, patchdpo, focusdpo"):
        get_objective("ipo")
    with pytest.raises(ValueError, match="'dpo' is already registered"):
        register_objective(get_objective("dpo"))
    with pytest.raises(ValueError, match="name ' x' is invalid"):
        Objective(" x", False, False, False, loss=lambda *a: None)


def test_a_registered_objective_is_validated_and_trained_by_the_step(tiny_env, monkeypatch) -> None:
    """``focus-sft``: regression on the positives weighted by the focus, no reference, no negative."""
    seen = {}

    def loss(pol_w, pol_l, ref_w, ref_l, weights, m_prior_tok, beta, lambda_sft, patch_alpha):
        seen.update(pol_l=pol_l, ref_w=ref_w, weights=weights, pol_w=pol_w.detach())
        value = weighted_error(pol_w, weights)  # sum_n W[n] e(x^w)[n] / N
        return value, {"loss": value.detach(), "err_w": value.detach()}

    with pytest.raises(ConfigError, match="train.objective='focus-sft' is invalid"):
        tiny_config(*tiny_env, train__objective="focus-sft")
    monkeypatch.setitem(_REGISTRY, "focus-sft", Objective("focus-sft", False, False, True, loss))
    cfg = tiny_config(*tiny_env, train__objective="focus-sft")
    torch.manual_seed(0)
    backbone = load_backbone(cfg.model)
    backbone.add_lora(cfg.lora)
    batch = validation_batch(DipDataset(ensure_toy_dip(cfg)), 2)
    out = pair_step(backbone.predict, backbone, batch, NoiseKey(0, 1), cfg)
    w, e = seen["weights"], seen["pol_w"]
    assert seen["pol_l"] is None and seen["ref_w"] is None  # the step ran neither the negative nor the reference
    assert w.shape == e.shape and torch.allclose(w.mean(dim=1), torch.ones(2), atol=1e-5)  # W: mean 1
    assert out.loss.item() == pytest.approx(float((w * e).sum(dim=1).div(e.shape[1]).mean()), rel=1e-6)
    assert out.metrics["a"].shape == (2,)  # focus metrics are logged for a focus objective
    direct, _ = objective_loss("focus-sft", e, weights=w)
    assert torch.allclose(direct.mean(), out.loss)
    assert resolve_variants(["focus-sft", "dpo"]) == {"focus-sft": ("train.objective=focus-sft",),
                                                      "dpo": ("train.objective=dpo",)}  # compare knows it too
