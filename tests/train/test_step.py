"""The per-pair training step: shared noise, known first-step values, LoRA-only gradients, every objective
learning a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch
from train_fixtures import tiny_config

from focusdpo.backbones import load_backbone
from focusdpo.config import Config, LossConfig
from focusdpo.data import ensure_toy_dip
from focusdpo.data.dataset import DipDataset
from focusdpo.sampling import draw_noise
from focusdpo.train.step import NoiseKey, pair_step
from focusdpo.train.trainer import PolicyModule, validation_batch


def _setup(tiny_env, **extra) -> tuple[Config, object, dict]:
    root, base = tiny_env
    cfg = tiny_config(root, base, **extra)
    torch.manual_seed(0)
    backbone = load_backbone(cfg.model)
    backbone.add_lora(cfg.lora)
    batch = validation_batch(DipDataset(ensure_toy_dip(cfg)), 2)
    return cfg, backbone, batch


def test_noise_key_is_the_same_for_any_process_count() -> None:
    """Two processes with 2 pairs each draw exactly the noise of one process with 4 pairs."""
    cfg = LossConfig()
    whole = NoiseKey(seed=3, step=7, micro=1).draw(4, 16, 12, cfg)
    parts = [NoiseKey(seed=3, step=7, micro=1, rank=r, world=2).draw(2, 16, 12, cfg) for r in range(2)]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))
    other = NoiseKey(seed=3, step=8, micro=1).draw(4, 16, 12, cfg)
    assert not torch.equal(whole[0], other[0])


def test_timesteps_are_logit_normal_and_shifted() -> None:
    """Without the shift the median of s is sigmoid(logit_mean) = 0.5; the FLUX shift (mu = 0.5 at 256 tokens)
    moves it to e^0.5 / (e^0.5 + 1) = 0.622."""
    gen = torch.Generator().manual_seed(0)
    _, s = draw_noise(gen, 20000, (256, 4), 256, LossConfig(time_shift=False))
    assert abs(float(s.median()) - 0.5) < 0.02 and 0 < float(s.min()) and float(s.max()) < 1
    _, s = draw_noise(torch.Generator().manual_seed(0), 20000, (256, 4), 256, LossConfig(time_shift=True))
    assert abs(float(s.median()) - math.exp(0.5) / (math.exp(0.5) + 1)) < 0.02


def test_pair_shares_noise_and_timestep(tiny_env) -> None:
    """Both sides of a pair get the same eps and s: x_t^w - x_t^l = (1 - s)(x0^w - x0^l), hence exactly zero on
    every token outside M_prior (where the negative equals the positive), and nonzero inside."""
    cfg, backbone, batch = _setup(tiny_env, train__objective="dpo")
    seen = {}

    def spy(x_t, t, text, refs, grid, tap=False, ref_masks=None):
        seen["x_t"], seen["t"] = x_t.detach(), t.detach()
        return backbone.predict(x_t, t, text, refs, grid, tap=tap, ref_masks=ref_masks)

    pair_step(spy, backbone, batch, NoiseKey(0, 1), cfg)
    b = batch["positive"].shape[0]
    diff = (seen["x_t"][:b] - seen["x_t"][b:]).abs().amax(dim=-1)  # [B, N]
    p = backbone.patch
    outside = torch.nn.functional.avg_pool2d(batch["m_prior"][:, None], p).flatten(1) == 0
    assert torch.equal(seen["t"][:b], seen["t"][b:])
    assert float(diff[outside].max()) == 0.0
    assert float(diff[~outside].max()) > 0.0


@pytest.mark.parametrize("objective", ["dpo", "focusdpo"])
def test_first_dpo_step_is_log2(tiny_env, objective) -> None:
    """LoRA starts with B = 0, so policy == reference: every margin is 0 and the loss is exactly log 2."""
    cfg, backbone, batch = _setup(tiny_env, train__objective=objective)
    out = pair_step(backbone.predict, backbone, batch, NoiseKey(0, 1), cfg)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.all(out.metrics["margin"] == 0)
    for key in ("loss", "implicit_acc", "margin", "err_w", "err_l", "ref_err_w", "ref_err_l"):
        assert out.metrics[key].shape == (2,), key
    if objective == "dpo":  # dpo uses no focus: none is computed unless asked (focus.log_alignment)
        assert "a" not in out.metrics and out.focus is None
    else:
        assert out.metrics["a"].shape == out.metrics["w_confused"].shape == (2,)


def test_focusdpo_without_focus_terms_is_dpo(tiny_env) -> None:
    """With spaf, dpce and the gate off W = 1 exactly, so focusdpo reproduces dpo on the same noise."""
    cfg_f, backbone, batch = _setup(tiny_env, train__objective="focusdpo", focus__spaf="false",
                                    focus__dpce="false")
    with torch.no_grad():
        for n, p in backbone.trainable().named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # policy != reference, so the loss depends on the weights
    cfg_d = tiny_config(*tiny_env, train__objective="dpo")
    f = pair_step(backbone.predict, backbone, batch, NoiseKey(0, 1), cfg_f)
    d = pair_step(backbone.predict, backbone, batch, NoiseKey(0, 1), cfg_d)
    assert f.loss.item() != pytest.approx(math.log(2), abs=1e-4)
    assert f.loss.item() == pytest.approx(d.loss.item(), rel=1e-6)


def test_only_lora_parameters_get_gradients(tiny_env) -> None:
    cfg, backbone, batch = _setup(tiny_env, train__objective="focusdpo")
    module = PolicyModule(backbone)
    out = pair_step(module, backbone, batch, NoiseKey(0, 1), cfg)
    out.loss.backward()
    with_grad = [n for n, p in module.named_parameters() if p.grad is not None]
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in module.named_parameters() if ".lora_B." in n)
    assert all(p.grad is None for p in backbone.text_encoder.parameters())


@pytest.mark.parametrize("objective", ["sft", "dpo", "patchdpo", "focusdpo"])
def test_each_objective_lowers_its_loss_on_a_fixed_batch(tiny_env, objective) -> None:
    cfg, backbone, batch = _setup(tiny_env, train__objective=objective)
    module = PolicyModule(backbone)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(5):
        out = pair_step(module, backbone, batch, NoiseKey(0, 1), cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1e-4, losses


def test_reference_complexity_planted_and_wired_into_the_step(tiny_env) -> None:
    """A flat reference has complexity 0, a noisy one > 0; focus.ref_complexity_scale > 0 trains a step (it used to
    fail for want of ref_complexity) and scales the subjects' weights by 1 + c * complexity."""
    from focusdpo.config import FocusConfig
    from focusdpo.train.step import reference_complexity

    flat = torch.full((1, 3, 16, 16), 0.5)
    noisy = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = [torch.ones(1, 16), torch.ones(1, 16)]
    c = reference_complexity([flat, noisy], masks, 4, FocusConfig())
    assert c.shape == (1, 2) and c[0, 0] == 0.0 and 0.2 < float(c[0, 1]) <= 1.0  # 0.46 after the 1 px blur
    cfg0, backbone, batch = _setup(tiny_env, train__objective="focusdpo")
    plain = pair_step(backbone.predict, backbone, batch, NoiseKey(0, 1), cfg0)
    cfg1 = cfg0.with_overrides(["focus.ref_complexity_scale=1.0"])
    scaled = pair_step(backbone.predict, backbone, batch, NoiseKey(0, 1), cfg1)
    assert torch.isfinite(scaled.loss) and not torch.equal(plain.focus.W, scaled.focus.W)
