"""A full FocusDPO training step (``focusdpo.train.step.pair_step``) on the tiny real stack:
diffusers FLUX transformer + AutoencoderKL + T5 + CLIP loaded from a local folder, LoRA attached.

Planted value: at LoRA initialisation (``B = 0``) the policy equals the reference, so every implicit reward
difference is 0 and the DPO/FocusDPO loss is exactly ``-log sigmoid(0) = log 2``.
"""

from __future__ import annotations

import math

import pytest
import torch

from flux_tiny import write_tiny_flux_folder
from focusdpo.backbones import load_backbone
from focusdpo.config import Config, LoraConfig, ModelConfig, TrainConfig
from focusdpo.train.step import NoiseKey, pair_step


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_tiny_flux_folder(tmp_path_factory.mktemp("flux"), seed=0))


def dip_batch(b: int = 2, size: int = 64, ref: int = 32, patch: int = 16, seed: int = 0) -> dict:
    """Two subjects (left and right halves); the negative differs from the positive only inside M_prior."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(b, 3, size, size, generator=g)
    regions = torch.zeros(b, 2, size, size)
    regions[:, 0, :, : size // 2] = 1
    regions[:, 1, :, size // 2:] = 1
    m_prior = torch.zeros(b, size, size)
    m_prior[:, : size // 2, : size // 2] = 1
    neg = torch.where(m_prior[:, None] > 0, torch.rand(b, 3, size, size, generator=g), pos)
    h = size // patch
    return {"id": [f"r{i}" for i in range(b)], "prompt": ["a red dog and a blue cat", "a toy and a cat"][:b],
            "positive": pos, "negative": neg, "m_prior": m_prior, "regions": regions,
            "references": [torch.rand(b, 3, ref, ref, generator=g) for _ in range(2)],
            "ref_masks": [torch.ones(b, ref, ref) for _ in range(2)],
            "m_d": torch.rand(b, h, h, generator=g), "m_d_patch": patch}


@pytest.fixture(scope="module")
def stack(folder: str):
    """``(cfg, backbone)`` with LoRA at its initialisation (``B = 0``); the last test trains it."""
    cfg = Config(model=ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16,
                                   patch=16),
                 lora=LoraConfig(rank=4, alpha=4.0), train=TrainConfig(objective="focusdpo"))
    bb = load_backbone(cfg.model)
    bb.add_lora(cfg.lora)
    return cfg, bb


def test_step_at_lora_init_is_log_2(stack) -> None:
    cfg, bb = stack
    batch = dip_batch()
    for objective in ("dpo", "focusdpo"):
        cfg.train.objective = objective
        out = pair_step(bb.predict, bb, batch, NoiseKey(seed=0, step=0), cfg)
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-5), objective
        torch.testing.assert_close(out.metrics["margin"], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.focus.W.mean(dim=1), torch.ones(2))
    assert out.focus.W.shape == (2, 16) and out.focus.matches.shape == (2, 2, 16)


def test_focusdpo_step_trains_only_the_lora_and_lowers_the_loss(stack) -> None:
    cfg, bb = stack
    cfg.train.objective = "focusdpo"
    batch, noise = dip_batch(), NoiseKey(seed=0, step=0)
    out = pair_step(bb.predict, bb, batch, noise, cfg)
    out.loss.backward()
    named = dict(bb.transformer.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    grads = [named[n].grad for n in trainable if ".lora_B." in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) > 0
    torch.optim.SGD([named[n] for n in trainable], lr=1e-3).step()
    after = pair_step(bb.predict, bb, batch, noise, cfg)
    assert after.loss.item() < out.loss.item()
    assert after.metrics["margin"].sum() > 0  # the loss fell because the pairs' implicit reward margins rose
