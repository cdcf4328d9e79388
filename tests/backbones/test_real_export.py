"""LoRA export round trip: ``FluxPipeline.load_lora_weights(run_dir)`` reproduces our adapter's output."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from flux_tiny import write_tiny_flux_folder
from focusdpo.backbones import load_backbone
from focusdpo.backbones.flux import position_ids
from focusdpo.backbones.lora_export import (
    WEIGHT_NAME,
    diffusers_lora_state_dict,
    export_diffusers_lora,
    export_run,
    scaled_lora_state_dict,
)
from focusdpo.config import LoraConfig, ModelConfig
from focusdpo.lora import save_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_tiny_flux_folder(tmp_path_factory.mktemp("flux"), seed=0))


def _trained_backbone(folder: str, rank: int = 4, alpha: float = 8.0):
    bb = load_backbone(ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16,
                                   patch=16))
    bb.add_lora(LoraConfig(rank=rank, alpha=alpha, targets=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: B starts at zero, which would make the test vacuous
        for name, p in bb.transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bb


def _inputs(bb):
    torch.manual_seed(0)
    tgt = bb.encode_images(torch.rand(2, 3, 32, 48))
    refs = [bb.encode_images(torch.rand(2, 3, 32, 32)), bb.encode_images(torch.rand(2, 3, 16, 16))]
    text = bb.encode_prompts(["a red dog on the grass", "a striped cat"])
    return torch.randn_like(tgt.tokens), torch.tensor([0.3, 0.8]), text, refs, tgt.grid


def _pipeline_predict(pipe: FluxPipeline, x_t, t, text, refs, grid) -> torch.Tensor:
    """The pipeline's transformer on the in-context sequence our adapter builds (same ids, guidance)."""
    seq = torch.cat([x_t] + [r.tokens for r in refs], dim=1)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=seq, encoder_hidden_states=text.tokens, pooled_projections=text.pooled,
                               timestep=t, img_ids=position_ids(grid, [r.grid for r in refs]),
                               txt_ids=torch.zeros(text.tokens.shape[1], 3), guidance=torch.full((len(t),), 4.0),
                               return_dict=False)[0]
    return out[:, : x_t.shape[1]]


def test_pipeline_load_lora_weights_reproduces_the_adapter(folder: str, tmp_path) -> None:
    bb = _trained_backbone(folder)
    x_t, t, text, refs, grid = _inputs(bb)
    with torch.no_grad():
        ours, _ = bb.predict(x_t, t, text, refs, grid)
        with bb.reference():
            base, _ = bb.predict(x_t, t, text, refs, grid)
    path = export_diffusers_lora(bb.trainable(), tmp_path / "run")
    assert path == tmp_path / "run" / WEIGHT_NAME
    pipe = FluxPipeline.from_pretrained(folder)
    torch.testing.assert_close(_pipeline_predict(pipe, x_t, t, text, refs, grid), base, rtol=1e-4, atol=1e-5)
    pipe.load_lora_weights(str(tmp_path / "run"))
    theirs = _pipeline_predict(pipe, x_t, t, text, refs, grid)
    assert (ours - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_file_uses_diffusers_names_and_folds_the_scale(folder: str, tmp_path) -> None:
    bb = _trained_backbone(folder, rank=4, alpha=2.0)
    export_diffusers_lora(bb.trainable(), tmp_path)
    sd = load_file(tmp_path / WEIGHT_NAME)
    a = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    b = "transformer.single_transformer_blocks.1.proj_out"
    assert a in sd and f"{b}.lora_B.weight" in sd
    assert not any(".default." in k or "base_model" in k for k in sd)
    n_layers = 2 * 8 + 2 * 4 + 1  # double: 8 targets; single: q, k, v, proj_out; the final proj_out
    assert len(sd) == 2 * n_layers
    layer = bb.transformer.get_submodule("single_transformer_blocks.1.proj_out")
    torch.testing.assert_close(sd[f"{b}.lora_B.weight"], layer.lora_B["default"].weight * 0.5)  # alpha / r


def test_export_without_lora_raises(folder: str) -> None:
    bb = load_backbone(ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16,
                                   patch=16))
    with pytest.raises(ValueError, match="attach LoRA"):
        diffusers_lora_state_dict(bb.trainable())


def test_export_run_converts_the_trainers_lora_file_without_a_model(folder: str, tmp_path) -> None:
    bb = _trained_backbone(folder, rank=4, alpha=8.0)
    save_lora(tmp_path / "lora.safetensors", bb.lora_state_dict(), metadata={"rank": "4", "alpha": "8.0"})
    path = export_run(tmp_path)
    assert path == tmp_path / WEIGHT_NAME
    want = export_diffusers_lora(bb.trainable(), tmp_path / "direct")
    got, ref = load_file(path), load_file(want)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    (tmp_path / "bare").mkdir()
    save_lora(tmp_path / "bare" / "lora.safetensors", bb.lora_state_dict())
    with pytest.raises(ValueError, match="no rank/alpha metadata"):
        export_run(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="lora.safetensors"):
        export_run(tmp_path / "direct")


def test_scaled_state_dict_rejects_what_is_not_lora_pairs() -> None:
    a, b = torch.ones(2, 3), torch.ones(3, 2)
    out = scaled_lora_state_dict({"x.lora_A.weight": a, "x.lora_B.weight": b}, 0.5)
    assert torch.equal(out["x.lora_B.weight"], b * 0.5) and torch.equal(out["x.lora_A.weight"], a)
    with pytest.raises(ValueError, match="unpaired"):
        scaled_lora_state_dict({"x.lora_A.weight": a}, 1.0)
    with pytest.raises(ValueError, match="unexpected keys"):
        scaled_lora_state_dict({"x.lora_A.weight": a, "x.lora_B.weight": b, "x.alpha": torch.ones(())}, 1.0)
