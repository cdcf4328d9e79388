"""A quantised frozen base (``model.quantization``, issue 17 point 1) on the tiny FLUX stack, on the CPU.

What is checked: which layers are quantised and what they weigh; peft wraps them (LoRA on top, the base frozen,
adapters off = the quantised base); unsupported combinations fail at once naming why; the trainer's per-step
loss with an int8 base follows the float32 base within 3e-3 over 20 steps (measured: 6e-4 max, 1e-3 relative);
a resumed int8 run equals an uninterrupted one step for step; the LoRA trained on an int8 base exports to a file
that diffusers' ``FluxPipeline.load_lora_weights`` loads.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from train_fixtures import tiny_config

from focusdpo.backbones import load_backbone
from focusdpo.config import ConfigError, LoraConfig, ModelConfig, load_config
from focusdpo.lora import adapters_merged
from focusdpo.quantization import (
    check_quantization,
    is_quantized_layer,
    quantization_of,
    quantize_frozen,
    quantized_linears,
    tensor_nbytes,
)
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backbones"))  # test_real_export's helpers

pytest.importorskip("torchao")
warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")


def _tiny(tiny_env, mode: str):
    cfg = tiny_config(*tiny_env, model__quantization=mode)
    return cfg, load_backbone(cfg.model)


@pytest.mark.parametrize("mode, bytes_per_weight", [("int8", 1), ("fp8", 1)])
def test_block_linears_are_quantised_and_the_rest_is_not(tiny_env, mode, bytes_per_weight) -> None:
    _, plain = _tiny(tiny_env, "none")
    _, bb = _tiny(tiny_env, mode)
    assert quantization_of(plain.trainable()) == "none" and quantization_of(bb.trainable()) == mode
    names = [n for n, _ in quantized_linears(plain.trainable())]
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    modules = dict(bb.trainable().named_modules())
    for name, layer in quantized_linears(plain.trainable()):
        q = modules[name].weight
        assert type(q) is not nn.Parameter and q.shape == layer.weight.shape
        out_f, in_f = layer.weight.shape
        # packed weights plus one float32 scale per output row (int8 also one zero point: at most 4 + 4 bytes)
        assert out_f * in_f * bytes_per_weight < tensor_nbytes(q) <= out_f * in_f * bytes_per_weight + 8 * out_f
        torch.testing.assert_close(q.dequantize(), layer.weight, atol=0.02 * layer.weight.abs().max(), rtol=0.1)
    assert not is_quantized_layer(bb.trainable().proj_out) and not is_quantized_layer(bb.trainable().x_embedder)


def test_lora_sits_on_the_quantised_layers_and_off_is_the_quantised_base(tiny_env) -> None:
    cfg, bb = _tiny(tiny_env, "int8")
    torch.manual_seed(0)
    x = bb.encode_images(torch.rand(2, 3, 16, 16))
    refs = [bb.encode_images(torch.rand(2, 3, 8, 8))]
    text = bb.encode_prompts([" ".join(bb.text_encoder.vocabulary[:3])] * 2)
    args = (torch.randn_like(x.tokens), torch.tensor([0.3, 0.8]), text, refs, x.grid)
    with torch.no_grad():
        base, _ = bb.predict(*args)
        bb.add_lora(cfg.lora)
        for name, p in bb.trainable().named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.1)
        ours, _ = bb.predict(*args)
        with bb.reference():
            off, _ = bb.predict(*args)
        with adapters_merged(bb.trainable()):  # quantised layers stay unmerged: the same function
            merged, _ = bb.predict(*args)
    to_q = bb.trainable().transformer_blocks[0].attn.to_q
    assert is_quantized_layer(to_q) and type(to_q).__name__ == "TorchaoLoraLinear"
    assert to_q.lora_A["default"].weight.dtype == torch.float32 and to_q.lora_A["default"].weight.requires_grad
    assert not any(p.requires_grad for n, p in bb.trainable().named_parameters() if "lora_" not in n)
    assert torch.equal(off, base)  # the DPO reference: the same quantised base, adapters off
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, ours)


def test_nf4_wraps_with_bitsandbytes_in_training_mode() -> None:
    """The nf4 conversion itself (bitsandbytes Linear4bit, peft's bnb LoRA layer); the trainer refuses nf4 on the
    CPU (see the next test), so this runs the layer in training mode only, where bitsandbytes' CPU path works."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.ModuleList([nn.Linear(64, 64)]), nn.Linear(64, 8)).requires_grad_(False)
    x = torch.randn(4, 64)
    ref = model[0][0](x)
    assert quantize_frozen(model, "nf4") == 1 and quantization_of(model) == "nf4"
    assert type(model[1]) is nn.Linear  # outside the block list: untouched
    # 4 bits a weight + one absmax per 64-block, itself quantised to uint8 (double quantisation: one float32 absmax
    # per 256 blocks) + the 16-entry nf4 table and the 256-entry absmax table (float32)
    assert tensor_nbytes(model[0][0].weight) == 64 * 64 // 2 + 64 + 16 * 4 + 4 + 256 * 4
    assert (model[0][0](x) - ref).abs().max() < 0.15 * ref.abs().max()  # 4-bit: coarse but the same layer
    inject_adapter_in_model(PeftLoraConfig(r=4, target_modules=["0.0"], init_lora_weights=False), model)
    model[0][0](x).sum().backward()
    assert is_quantized_layer(model[0][0]) and model[0][0].lora_A["default"].weight.grad.abs().sum() > 0


def test_unsupported_combinations_fail_at_once_with_the_reason(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="model.quantization='int4' is invalid: allowed one of none, int8, fp8, nf4"):
        ModelConfig(quantization="int4")
    with pytest.raises(ConfigError, match="nf4.*invalid on the CPU.*multiple of 64"):
        check_quantization("nf4", "cpu")
    with pytest.raises(ConfigError, match="on device mps"):
        check_quantization("int8", "mps")
    check_quantization("int8", "cpu")
    check_quantization("fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(ConfigError, match=r"fp8.*A10 \(compute capability 8.6\).*>= 8.9.*allowed int8 or nf4"):
        check_quantization("fp8", "cuda")
    check_quantization("nf4", "cuda")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs torchao.*focusdpo\[quant\]"):
        check_quantization("int8", "cpu")


def test_trainer_refuses_nf4_on_the_cpu_before_any_work(tiny_env, tmp_path) -> None:
    cfg = tiny_config(*tiny_env, model__quantization="nf4", train__output_dir=tmp_path / "run")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs nf4")
    with pytest.raises(ConfigError, match="nf4"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def test_int8_per_step_loss_follows_the_float32_base_over_20_steps(tiny_env, tmp_path) -> None:
    """20 focusdpo steps, same data and noise: |loss_int8 - loss_fp32| <= 3e-3 at every step (6e-4 measured);
    step 1 is log 2 in both (LoRA B = 0: policy == reference, also on the quantised base)."""
    runs = {}
    for mode in ("none", "int8"):
        cfg = tiny_config(*tiny_env, model__quantization=mode, train__max_steps=20, train__val_records=1,
                          train__output_dir=tmp_path / mode)
        runs[mode] = _losses(train(cfg))
    assert len(runs["int8"]) == 20
    assert runs["int8"][0] == pytest.approx(0.6931471805599453, abs=1e-6)
    diffs = [abs(a - b) for a, b in zip(runs["int8"], runs["none"], strict=True)]
    assert max(diffs) <= 3e-3
    assert max(diffs) > 0  # it really ran on int8 weights
    assert (tmp_path / "int8" / "config.yaml").read_text().count("quantization: int8") == 1


def test_int8_resume_is_exact(tiny_env, tmp_path) -> None:
    kw = dict(model__quantization="int8", train__checkpoint_every=2, train__val_records=1)
    straight = train(tiny_config(*tiny_env, train__max_steps=4, train__output_dir=tmp_path / "a", **kw))
    out = tmp_path / "b"
    train(tiny_config(*tiny_env, train__max_steps=2, train__output_dir=out, **kw))
    train(tiny_config(*tiny_env, train__max_steps=4, train__output_dir=out, **kw), resume=True)
    assert _losses(out) == _losses(straight)


def test_lora_trained_on_an_int8_base_exports_and_loads_in_diffusers(tmp_path) -> None:
    """The adapter of an int8 FLUX.1 stack (``model.backbone=flux``, a tiny diffusers folder) exports under the same
    names as on the plain base, and ``FluxPipeline.load_lora_weights`` on the plain base changes its prediction by
    what the adapter adds on the int8 base (to int8 rounding)."""
    from diffusers import FluxPipeline
    from test_real_export import TARGETS, _inputs, _pipeline_predict

    from flux_tiny import write_tiny_flux_folder
    from focusdpo.backbones.lora_export import export_diffusers_lora

    folder = str(write_tiny_flux_folder(tmp_path / "flux", seed=0))
    cfgs = {m: ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16, patch=16,
                           quantization=m) for m in ("none", "int8")}
    bbs = {m: load_backbone(c) for m, c in cfgs.items()}
    assert quantization_of(bbs["int8"].trainable()) == "int8"
    for bb in bbs.values():
        bb.add_lora(LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bbs["int8"].trainable().named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    assert set(bbs["int8"].lora_state_dict()) == set(bbs["none"].lora_state_dict())
    x_t, t, text, refs, grid = _inputs(bbs["int8"])
    with torch.no_grad():
        ours, _ = bbs["int8"].predict(x_t, t, text, refs, grid)
        with bbs["int8"].reference():
            base, _ = bbs["int8"].predict(x_t, t, text, refs, grid)
    export_diffusers_lora(bbs["int8"].trainable(), tmp_path / "run")
    pipe = FluxPipeline.from_pretrained(folder)
    plain = _pipeline_predict(pipe, x_t, t, text, refs, grid)
    pipe.load_lora_weights(str(tmp_path / "run"))
    theirs = _pipeline_predict(pipe, x_t, t, text, refs, grid)
    delta_ours, delta_theirs = ours - base, theirs - plain
    assert delta_ours.abs().max() > 1e-2
    assert (delta_theirs - delta_ours).abs().max() <= 0.02 * delta_ours.abs().max()


def test_config_default_and_round_trip() -> None:
    cfg = load_config(None, ["model.quantization=int8"])
    assert cfg.model.quantization == "int8" and load_config(None).model.quantization == "none"


def test_flux2_loader_quantises_its_blocks_and_lora_wraps_them(tmp_path) -> None:
    from flux2_tiny import write_tiny_flux2_folder

    folder = str(write_tiny_flux2_folder(tmp_path / "flux2", seed=0))
    bb = load_backbone(ModelConfig.of(backbone="flux2", checkpoint=folder, patch=16, max_text_tokens=64,
                                   quantization="int8"))
    assert quantization_of(bb.trainable()) == "int8"
    assert not any(p.requires_grad for p in bb.trainable().parameters())
    n = bb.add_lora(LoraConfig(rank=4, alpha=4.0, targets=["to_q", "to_k", "to_v", "to_qkv_mlp_proj"]))
    assert n > 0 and is_quantized_layer(bb.trainable().single_transformer_blocks[0].attn.to_qkv_mlp_proj)


def test_pretrain_refuses_a_quantised_base(tmp_path) -> None:
    from focusdpo.train.pretrain import pretrain

    with pytest.raises(ValueError, match="model.quantization='int8' is invalid for pretrain"):
        pretrain(load_config(None, ["model.quantization=int8"]), tmp_path / "out")


@pytest.mark.slow
def test_int8_base_under_ddp_two_processes_matches_one_process(tiny_env, tmp_path) -> None:
    """2 CPU processes (gloo, DDP) x 1 pair on an int8 base == 1 process x 2 pairs, within 1e-4 (DDP is told to
    leave the frozen quantised weights alone: its start-up broadcast does not support torchao tensors)."""
    from test_runs_slow import _env, _free_port, _run, _train
    from train_fixtures import tiny_overrides

    env = _env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    same = ("model.quantization=int8", "train.max_steps=3")
    _run(_train(tiny_env, tmp_path, "data.batch_size=2", f"train.output_dir={one}", *same), env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "focusdpo", "train", *tiny_overrides(*tiny_env),
              "data.batch_size=1", f"train.output_dir={two}", *same]
    _run(launch, {**env, "ACCELERATE_USE_CPU": "1"})
    for ra, rb in zip(read_metrics(one), read_metrics(two), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_quantised_base_trains_on_cuda(tiny_env, tmp_path, mode) -> None:
    """The CUDA paths the CPU cannot run: nf4 (bitsandbytes) and fp8 where the device has it; step 1 is log 2 (LoRA B
    = 0 on the quantised base), the losses stay finite and the run records CUDA peaks."""
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ConfigError, match="fp8 needs >= 8.9"):
            check_quantization("fp8", "cuda")
        return
    run = train(tiny_config(*tiny_env, model__quantization=mode, train__optimizer="adamw8bit", train__max_steps=3,
                            train__val_records=1, train__output_dir=tmp_path / mode))
    rows = read_metrics(run)
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    report = json.loads((run / "memory.json").read_text())
    assert report["peak_mem_mib"] == "cuda_allocated" and all(r["peak_mem_mib"] > 0 for r in rows)
