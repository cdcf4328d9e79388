"""Memory reporting (issue 17 point 3): measured weight bytes and per-step peaks in a run, and the dry-run budget.

The budget's weights are counted from the architecture on the meta device: on the tiny stacks they must equal the
bytes of the loaded model exactly (float32, int8, fp8; the LoRA; the optimizer state after one step). Its activation
constant is fitted to one measured anchor (FLUX.1-dev, no checkpointing: 44 GiB) and must predict the other
(checkpointing: 24.8 GiB, DESIGN section 5) within 2 %. FLUX.1-dev at 512 px with nf4 or int8 and train.memory=low
must fit 24 GB.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from train_fixtures import tiny_config
from typer.testing import CliRunner

from focusdpo.backbones import load_backbone
from focusdpo.cli import app
from focusdpo.config import ModelConfig, load_config
from focusdpo.train.budget import GB, GIB, estimate_budget
from focusdpo.train.memory import optimizer_state_bytes, weight_bytes
from focusdpo.train.optimizers import make_optimizer
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import train

warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
FLUX_UNO = "configs/flux-uno.yaml"


def _part(budget, prefix: str) -> float:
    (value,) = [v for k, v in budget.parts.items() if k.startswith(prefix)]
    return value


@pytest.mark.parametrize("quantization", ["none", "int8", "fp8"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_budget_weights_equal_the_loaded_tiny_model(tiny_env, quantization, optimizer) -> None:
    pytest.importorskip("torchao")
    cfg = tiny_config(*tiny_env, model__quantization=quantization, train__optimizer=optimizer)
    budget = estimate_budget(cfg)
    bb = load_backbone(cfg.model)
    bb.add_lora(cfg.lora)
    params = [p for p in bb.trainable().parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, 1e-3, 0.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    measured = weight_bytes(bb, opt)
    assert _part(budget, "frozen transformer") == measured["frozen_base"]
    assert _part(budget, "LoRA adapters") == measured["adapters"] == _part(budget, "LoRA gradients")
    assert _part(budget, "optimizer state") == measured["optimizer_state"] == optimizer_state_bytes(opt)
    if quantization != "none":
        plain = estimate_budget(tiny_config(*tiny_env))
        assert _part(budget, "frozen transformer") < 0.5 * _part(plain, "frozen transformer")


def test_budget_adamw8bit_state_equals_bitsandbytes(tiny_env) -> None:
    """The 8-bit state with LoRA matrices over bitsandbytes' 4096-element threshold (rank 64 x width 64)."""
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(*tiny_env, train__optimizer="adamw8bit", lora__rank=64, lora__alpha=64.0,
                      **{"model__flux-tiny__head_dim": 32, "model__flux-tiny__num_heads": 2})
    budget = estimate_budget(cfg)
    from focusdpo.backbones.flux import build_tiny

    bb = build_tiny(cfg.model, ["a", "b"])
    bb.add_lora(cfg.lora)
    params = [p for p in bb.trainable().parameters() if p.requires_grad]
    assert all(p.numel() >= 4096 for p in params)  # every matrix gets 8-bit state
    opt = make_optimizer("adamw8bit", params, 1e-3, 0.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert _part(budget, "optimizer state") == optimizer_state_bytes(opt)
    # 2 bytes a weight + per-block absmax + two 256-entry maps per tensor (2.53 here), vs AdamW's 8 bytes a weight
    assert optimizer_state_bytes(opt) < 0.35 * 8 * sum(p.numel() for p in params)


def test_budget_reads_a_local_diffusers_folder(tmp_path) -> None:
    """``model.backbone=flux`` on a tiny diffusers folder: the transformer's bytes equal the loaded model's."""
    from flux_tiny import write_tiny_flux_folder

    folder = write_tiny_flux_folder(tmp_path / "flux", seed=0)
    cfg = load_config(None, ["model.backbone=flux", f"model.checkpoint={folder}", "model.flux.guidance=4.0",
                             "model.patch=16", "model.max_text_tokens=16", "model.quantization=int8"])
    budget = estimate_budget(cfg, size=64)
    bb = load_backbone(ModelConfig.of(backbone="flux", checkpoint=str(folder), guidance=4.0, patch=16,
                                   max_text_tokens=16, quantization="int8"))
    assert _part(budget, "frozen transformer") == weight_bytes(bb)["frozen_base"]
    assert _part(budget, "text encoders + VAE") == weight_bytes(bb)["encoders"] > 0
    assert budget.shape["tokens"] == 16 + 16 + 16 and any(str(folder) in n for n in budget.notes)


def test_activation_model_fits_one_anchor_and_predicts_the_other() -> None:
    """FLUX.1-dev, bf16, dpo (no tap), 512 px + one 512 px reference + 512 text tokens, AdamW, encoders off the GPU:
    44 GiB measured without checkpointing (the fit), 24.8 GiB with it (the prediction)."""
    over = ["model.quantization=none", "train.objective=dpo", "model.flux.offload_encoders=true", "data.batch_size=1",
            "model.max_text_tokens=512"]
    no_ckpt = estimate_budget(load_config(FLUX_UNO, over + ["train.gradient_checkpointing=false"]))
    ckpt = estimate_budget(load_config(FLUX_UNO, over + ["train.gradient_checkpointing=true"]))
    assert no_ckpt.shape["tokens"] == 2560 and no_ckpt.shape["blocks"] == 57
    assert no_ckpt.subtotal / GIB == pytest.approx(44.0, rel=0.02)
    assert ckpt.subtotal / GIB == pytest.approx(24.8, rel=0.02)
    assert _part(ckpt, "frozen transformer") == 11901408320 * 2  # FLUX.1-dev: 11.9 B parameters in bf16


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_dry_run_fits_flux1_dev_512px_on_24gb_with_low_memory(quantization) -> None:
    result = CliRunner().invoke(app, ["train", "--dry-run", "--config", FLUX_UNO, f"model.quantization={quantization}",
                                      "train.memory=low"])
    assert result.exit_code == 0, result.output
    total = re.search(r"\*\*total\*\* \| ([\d.]+) \| ([\d.]+) \|", result.output)
    assert total is not None and float(total.group(2)) <= 24.0
    assert "offloaded to the CPU" in result.output and "block inputs (checkpointed)" in result.output
    plain = estimate_budget(load_config(FLUX_UNO, ["model.quantization=none", "train.memory=fast"]))
    assert plain.total / GB > 24.0  # the bf16 base alone does not fit


def test_dry_run_rejects_a_size_that_is_not_a_multiple_of_the_patch() -> None:
    result = CliRunner().invoke(app, ["train", "--dry-run", "--config", FLUX_UNO, "--size", "500"])
    assert result.exit_code != 0 and "--size=500 is invalid: allowed a multiple of model.patch=16" in result.output


def test_run_records_weight_bytes_and_a_peak_per_step(tiny_env, tmp_path) -> None:
    pytest.importorskip("torchao")
    run = train(tiny_config(*tiny_env, model__quantization="int8", train__output_dir=tmp_path / "run",
                            train__max_steps=3, train__val_records=1))
    report = json.loads((run / "memory.json").read_text())
    parts = report["weight_bytes"]
    assert report["quantization"] == "int8" and report["step"] == 1
    assert parts["frozen_base"] > 0 and parts["adapters"] > 0
    assert parts["optimizer_state"] == 2 * parts["adapters"] + 4 * report_tensors(parts, run)
    peaks = [r["peak_mem_mib"] for r in read_metrics(run)]
    assert len(peaks) == 3 and all(p > 50 for p in peaks)  # a Python process with torch holds > 50 MiB
    assert report["peak_mem_mib"] in ("cpu_rss", "cpu_rss_lifetime", "cuda_allocated")


def report_tensors(parts: dict, run) -> int:
    """Number of LoRA tensors of the run (AdamW keeps one float32 step counter per tensor)."""
    from safetensors.torch import load_file

    return len(load_file(str(run / "lora.safetensors")))


def test_peak_memory_sees_a_large_allocation_and_resets() -> None:
    """In a fresh process (a long test session's allocator may serve the block from memory it already holds, which
    the RSS high-water mark cannot see): a touched 64 MiB block raises the peak; the next interval forgets it."""
    import json
    import subprocess
    import sys

    code = ("import json, torch\n"
            "from focusdpo.train.memory import PeakMemory\n"
            "peak = PeakMemory('cpu')\n"
            "before = peak.read()\n"
            "block = torch.ones(64 * 2**20 // 4)\n"
            "del block\n"
            "during = peak.read()\n"
            "after = peak.read()\n"
            "print(json.dumps([peak.kind, before, during, after]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    kind, before, during, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert during >= before + 60
    if kind == "cpu_rss":  # resettable: the next interval no longer holds the freed block
        assert after < during - 30


def test_budget_reads_a_local_flux2_folder(tmp_path) -> None:
    """FLUX.2's transformer, Qwen3 text encoder and VAE from their config.json: the bytes of the loaded model."""
    from flux2_tiny import write_tiny_flux2_folder

    folder = write_tiny_flux2_folder(tmp_path / "flux2", seed=0)
    over = ["model.backbone=flux2", f"model.checkpoint={folder}", "model.patch=16", "model.max_text_tokens=64",
            "model.quantization=int8", "lora.targets=[to_q,to_k,to_v,to_qkv_mlp_proj]"]
    budget = estimate_budget(load_config(None, over), size=32)
    bb = load_backbone(ModelConfig.of(backbone="flux2", checkpoint=str(folder), patch=16, max_text_tokens=64,
                                   quantization="int8"))
    measured = weight_bytes(bb)
    assert _part(budget, "frozen transformer") == measured["frozen_base"]
    assert _part(budget, "text encoders + VAE") == measured["encoders"] > 0


def test_dry_run_of_the_toy_config_prints_mib_and_trains_nothing(tmp_path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--dry-run", f"train.output_dir={out}"])
    assert result.exit_code == 0, result.output
    assert "| part | MiB | MB |" in result.output and "8 pair(s) per step" in result.output
    assert not out.exists()
