"""The diffusion convention is an object the backbone exposes: flow matching's known values, and an
epsilon-prediction convention (a planted DDPM-style one) that the step, the sampler and the trainer's check use
with no change to them."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import focusdpo.backbones as backbones
from focusdpo.backbones import register_backbone
from focusdpo.backbones.diffusion import FLOW, Diffusion, FlowMatching, diffusion_of
from focusdpo.backbones.flux import build_tiny
from focusdpo.cli import app
from focusdpo.config import Config, LossConfig, ModelConfig, SampleConfig
from focusdpo.sampling import draw_noise, flux_sigmas, generate
from focusdpo.train.step import NoiseKey, pair_step

TINY = dict(patch=4, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16, text_dim=16, max_text_tokens=16)
VOCAB = ["a", "ball", "box", "on", "the", "left", "and", "right"]


class Epsilon:
    """A variance-preserving epsilon-prediction convention: ``x_t = sqrt(1 - t^2) x0 + t eps``, target ``eps``;
    a DDIM step. Records every call, so a test sees who used it."""

    prediction = "epsilon"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def draw(self, generator, n, shape, n_tokens, cfg):
        self.calls.append("draw")
        return torch.randn((n, *shape), generator=generator), torch.full((n,), 0.6)

    def noisy(self, x0, eps, t):
        self.calls.append("noisy")
        t = t.to(x0.dtype)[:, None, None]
        return (1 - t**2).sqrt() * x0 + t * eps, eps

    def sampling_sigmas(self, steps, n_tokens, shift=True):
        self.calls.append("sigmas")
        return torch.linspace(0.99, 0.0, steps + 1)

    def initial_noise(self, batch, grid, channels, seed, device=None):
        self.calls.append("noise")
        return torch.zeros(batch, grid[0] * grid[1], channels, device=device)

    def step(self, x, pred, t, t_next):
        self.calls.append("step")
        x0 = (x - t * pred) / math.sqrt(1 - t**2)
        return math.sqrt(1 - t_next**2) * x0 + t_next * pred


def _tiny():
    torch.manual_seed(0)
    return build_tiny(ModelConfig.of(**TINY), VOCAB)


def test_flow_matching_known_values() -> None:
    x0, eps = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    x_t, target = FLOW.noisy(x0, eps, torch.tensor([0.0, 1.0]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], eps[1]) and torch.equal(target, eps - x0)
    x_half, _ = FLOW.noisy(x0, eps, torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(x_half, 0.75 * x0 + 0.25 * eps)
    # one Euler step along the exact velocity lands on the clean sample
    torch.testing.assert_close(FLOW.step(x_half, eps - x0, 0.25, 0.0), x0)
    assert torch.equal(FLOW.sampling_sigmas(6, 64), flux_sigmas(6, 64))
    a = FLOW.draw(torch.Generator().manual_seed(1), 4, (8, 3), 8, LossConfig())
    b = draw_noise(torch.Generator().manual_seed(1), 4, (8, 3), 8, LossConfig())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert isinstance(FlowMatching(), Diffusion) and isinstance(Epsilon(), Diffusion)
    assert diffusion_of(object()) is FLOW and _tiny().diffusion is FLOW


def test_the_step_noises_and_regresses_with_the_backbones_convention() -> None:
    """With an epsilon convention on the backbone, the step's x_t and target are that convention's: planting the
    exact epsilon as the prediction gives zero error on both sides."""
    bb = _tiny()
    conv = Epsilon()
    bb.diffusion = conv
    cfg = Config(model=ModelConfig.of(**TINY))
    cfg.train.objective = "sft"
    g = torch.Generator().manual_seed(0)
    batch = {"positive": torch.rand(2, 3, 16, 16, generator=g), "negative": torch.rand(2, 3, 16, 16, generator=g),
             "m_prior": torch.zeros(2, 16, 16), "regions": torch.ones(2, 1, 16, 16),
             "references": [torch.rand(2, 3, 8, 8, generator=g)], "ref_masks": [torch.ones(2, 8, 8)],
             "m_d": torch.zeros(2, 4, 4), "m_d_patch": 4, "prompt": ["a ball", "a box"], "id": ["0", "1"],
             "disruption": ["x", "x"]}
    key = NoiseKey(0, 3)
    eps, _ = key.draw(2, 16, 48, cfg.loss, Epsilon())
    x0 = bb.encode_images(batch["positive"]).tokens
    expected_x_t = math.sqrt(1 - 0.36) * x0 + 0.6 * eps
    seen = {}

    def oracle(x_t, t, text, refs, grid, tap=False, ref_masks=None):
        seen["x_t"], seen["t"] = x_t, t
        return eps.clone().requires_grad_(True), None

    out = pair_step(oracle, bb, batch, key, cfg)
    torch.testing.assert_close(seen["x_t"], expected_x_t)
    assert torch.all(seen["t"] == 0.6) and out.loss.item() == 0.0
    assert conv.calls[:2] == ["draw", "noisy"]


def test_the_sampler_uses_the_backbones_noise_schedule_and_update() -> None:
    bb = _tiny()
    conv = Epsilon()
    bb.diffusion = conv
    out = generate(bb, ["a ball"], [torch.rand(1, 3, 8, 8)], (16, 16), SampleConfig(steps=3), seed=0)
    assert out.shape == (1, 3, 16, 16)
    assert conv.calls == ["noise", "sigmas", "step", "step", "step"]


def test_the_trainer_checks_the_prediction_against_the_registry_before_any_work(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(backbones, "_BACKBONES", dict(backbones._BACKBONES))
    register_backbone("eps-net", lambda cfg, device: pytest.fail("loaded"), prediction="epsilon")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "model.backbone=eps-net", f"train.output_dir={out}"])
    assert result.exit_code == 2
    assert "loss.prediction='flow' is invalid for model.backbone='eps-net', whose diffusion convention predicts " \
           "epsilon: allowed epsilon" in result.output
    assert not out.exists()
