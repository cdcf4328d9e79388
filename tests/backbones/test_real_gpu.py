"""The real tiny FLUX stack on a CUDA device in bf16 (skipped without one): a FocusDPO step and the export."""

from __future__ import annotations

import math

import pytest
import torch

from flux_tiny import write_tiny_flux_folder
from focusdpo.backbones import load_backbone
from focusdpo.config import Config, LoraConfig, ModelConfig, TrainConfig
from focusdpo.train.step import NoiseKey, pair_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_focusdpo_step_on_cuda(tmp_path) -> None:
    from test_real_step import dip_batch

    folder = write_tiny_flux_folder(tmp_path, seed=0)
    cfg = Config(model=ModelConfig.of(backbone="flux", checkpoint=str(folder), guidance=4.0, max_text_tokens=16,
                                   patch=16, dtype="bfloat16", offload_encoders=True),
                 lora=LoraConfig(rank=4, alpha=4.0), train=TrainConfig(objective="focusdpo"))
    bb = load_backbone(cfg.model, device="cuda")
    bb.add_lora(cfg.lora)
    assert bb.device.type == "cuda" and next(bb.codec.vae.parameters()).device.type == "cpu"  # offloaded
    out = pair_step(bb.predict, bb, dip_batch(), NoiseKey(seed=0, step=0), cfg)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-3)
    out.loss.backward()
    grads = [p.grad for n, p in bb.transformer.named_parameters() if ".lora_B." in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_flux2_focusdpo_step_on_cuda(tmp_path) -> None:
    from test_real_step import dip_batch

    from flux2_tiny import write_tiny_flux2_folder

    folder = write_tiny_flux2_folder(tmp_path, seed=0)
    cfg = Config(model=ModelConfig.of(backbone="flux2", checkpoint=str(folder), max_text_tokens=64, patch=16,
                                   dtype="bfloat16", offload_encoders=True),
                 lora=LoraConfig(rank=4, alpha=4.0), train=TrainConfig(objective="focusdpo"))
    bb = load_backbone(cfg.model, device="cuda")
    bb.add_lora(cfg.lora)
    batch = dip_batch(size=64, ref=32)
    batch["prompt"] = ["a dog and a cat", "a toy"]
    out = pair_step(bb.predict, bb, batch, NoiseKey(seed=0, step=0), cfg)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-3)
    out.loss.backward()
    grads = [p.grad for n, p in bb.transformer.named_parameters() if ".lora_B." in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
