"""The flow-matching Euler sampler, the FLUX schedule and generate()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from focusdpo.backbones.flux import build_tiny
from focusdpo.config import ModelConfig, SampleConfig
from focusdpo.sampling import flux_sigmas, generate, sample, sample_grid, shift_mu, time_shift

VOCAB = ["a", "ball", "box", "on", "the", "left", "right", "and", "sand"]
TINY = dict(patch=4, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16, text_dim=16, max_text_tokens=16)


def test_shift_mu_matches_flux_anchor_points():
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)


def test_time_shift_known_value_and_endpoints():
    """s' = e^mu / (e^mu + 1/s - 1): at s = 0.5, mu = 0.5 this is e^0.5 / (e^0.5 + 1)."""
    s = torch.tensor([0.0, 0.5, 1.0])
    out = time_shift(s, 0.5)
    assert out[0] == 0 and out[2] == 1
    assert out[1].item() == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1), rel=1e-6)


def test_flux_sigmas_decrease_from_one_to_zero():
    sig = flux_sigmas(10, 64)
    assert sig.shape == (11,) and sig[0] == 1 and sig[-1] == 0
    assert torch.all(sig[1:] < sig[:-1])
    assert torch.allclose(flux_sigmas(4, 64, shift=False), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="sample.steps"):
        flux_sigmas(0, 64)


def test_euler_with_the_exact_velocity_lands_on_the_data():
    """On the straight path x_s = (1 - s) x0 + s eps the exact velocity is (x - x0) / s; Euler is then exact."""
    x0 = torch.randn(3, 5, 4)
    eps = torch.randn(3, 5, 4)
    seen = []

    def model_fn(x, t, target):
        return (x - target) / t[:, None, None]

    out = sample(model_fn, eps, flux_sigmas(7, 64), {"target": x0}, callback=lambda i, x, v, s: seen.append(s))
    assert torch.allclose(out, x0, atol=1e-5)
    assert len(seen) == 7 and seen[0] == 1.0


def _backbone():
    torch.manual_seed(0)
    return build_tiny(ModelConfig.of(**TINY), VOCAB)


def test_generate_is_deterministic_for_a_seed_and_varies_across_seeds():
    bb = _backbone()
    refs = [torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8)]
    prompts = ["a ball on the left and a box on the right on sand", "a box on the left and a ball on the right"]
    cfg = SampleConfig(steps=3)
    a = generate(bb, prompts, refs, (32, 32), cfg, seed=5)
    b = generate(bb, prompts, refs, (32, 32), cfg, seed=5)
    c = generate(bb, prompts, refs, (32, 32), cfg, seed=6)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_guidance_changes_the_output_and_one_is_plain_sampling():
    bb = _backbone()
    refs = [torch.rand(1, 3, 16, 16)]
    plain = generate(bb, ["a ball on sand"], refs, (16, 16), SampleConfig(steps=2, guidance=1.0))
    guided = generate(bb, ["a ball on sand"], refs, (16, 16), SampleConfig(steps=2, guidance=4.0))
    assert not torch.allclose(plain, guided)


def test_generate_rejects_mismatched_references():
    bb = _backbone()
    with pytest.raises(ValueError, match="references"):
        generate(bb, ["a ball", "a box"], [torch.rand(1, 3, 16, 16)], (16, 16), SampleConfig(steps=1))


def test_sample_grid_places_references_then_samples():
    refs = [torch.zeros(2, 3, 4, 4)]
    samples = [torch.ones(2, 3, 8, 8)]
    grid = sample_grid(refs, samples, pad=1)
    assert grid.shape == (2 * 9 + 1, 1 + 4 + 1 + 8 + 1, 3) and grid.dtype.name == "uint8"
    assert (grid[1:5, 1:5] == 0).all() and (grid[1:9, 6:14] == 255).all()


def test_cli_sample_writes_a_grid_of_references_samples_and_truth(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from focusdpo.backbones.flux import save_tiny
    from focusdpo.cli import app
    from focusdpo.config import WorldConfig
    from focusdpo.world import World

    cfg = ModelConfig.of(**{**TINY, "max_text_tokens": 20})
    torch.manual_seed(0)
    save_tiny(build_tiny(cfg, World(WorldConfig()).vocabulary()), tmp_path / "model.safetensors", cfg)
    overrides = [f"model.{k}={v}" for k, v in TINY.items() if k != "max_text_tokens"]
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["sample", "--out", str(out), "--n", "3", "--subjects", "2",
                                      f"model.checkpoint={tmp_path}", "sample.steps=2", *overrides])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    # 3 rows of (2 refs of 16 px, sample 32 px, truth 32 px) with 2 px padding
    assert grid.shape == (3 * 34 + 2, 2 + 18 * 2 + 34 * 2, 3)


def test_cli_sample_with_own_prompt_and_reference_files(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from focusdpo.backbones.flux import save_tiny
    from focusdpo.cli import app

    cfg = ModelConfig.of(**TINY)
    torch.manual_seed(0)
    save_tiny(build_tiny(cfg, VOCAB), tmp_path / "model.safetensors", cfg)
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (40, 40), colour).save(tmp_path / name)
    overrides = [f"model.{k}={v}" for k, v in TINY.items()]
    out = tmp_path / "own.png"
    args = ["sample", "--out", str(out), "--prompt", "a ball on the left and a box on the right on sand",
            "--ref", str(tmp_path / "a.png"), "--ref", str(tmp_path / "b.png"), f"model.checkpoint={tmp_path}",
            "sample.steps=2", *overrides]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    assert grid.shape == (34 + 2, 2 + 18 * 2 + 34, 3)
    assert (grid[2:18, 2:18] == [255, 0, 0]).all()  # the first reference, resized to world.ref_size
    bad = CliRunner().invoke(app, args[:4] + [f"model.checkpoint={tmp_path}", *overrides])
    assert bad.exit_code == 2 and "--ref" in bad.output
