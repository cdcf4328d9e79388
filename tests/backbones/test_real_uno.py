"""UNO LoRA import on a synthetic state dict shaped like UNO's ``dit_lora.safetensors``.

UNO's processors add ``up(down(x))`` to BFL FLUX's *fused* layers: ``img_attn.qkv`` (rows q, k, v), ``img_attn.proj``,
``txt_attn.qkv``, ``txt_attn.proj``, the q/k/v part of single blocks' ``linear1`` and ``linear2`` (input attn ⊕ mlp).
The merged diffusers layers, concatenated the BFL way, must reproduce ``fused(x) + up(down(x))``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

from flux_tiny import synthetic_uno_state_dict, tiny_flux_components
from focusdpo.backbones.uno import (
    DOUBLE_PAIRS,
    SINGLE_PAIRS,
    UnoLoraError,
    load_uno_lora_file,
    merge_uno_lora,
    uno_to_peft_state_dict,
)

RANK = 4  # synthetic_uno_state_dict's default rank


@pytest.fixture()
def transformer() -> FluxTransformer2DModel:
    return tiny_flux_components(seed=0, guidance_embeds=False)["transformer"]


def _fused(block_layers: list[torch.nn.Linear], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([layer(x) for layer in block_layers], dim=-1)


def test_merge_reproduces_unos_fused_layers(transformer: FluxTransformer2DModel) -> None:
    sd = synthetic_uno_state_dict(transformer)
    original = copy.deepcopy(transformer)
    n = merge_uno_lora(transformer, sd)
    cfg = transformer.config
    assert n == cfg.num_layers * 8 + cfg.num_single_layers * 4
    torch.manual_seed(1)
    for kind, prefix, pairs, n_blocks in (("double_blocks", "transformer_blocks", DOUBLE_PAIRS, cfg.num_layers),
                                          ("single_blocks", "single_transformer_blocks", SINGLE_PAIRS,
                                           cfg.num_single_layers)):
        for i in range(n_blocks):
            for pair, targets in pairs.items():
                down, up = sd[f"{kind}.{i}.processor.{pair}.down.weight"], sd[f"{kind}.{i}.processor.{pair}.up.weight"]
                x = torch.randn(3, 5, down.shape[1])
                old = [original.get_submodule(f"{prefix}.{i}.{t}") for t in targets]
                new = [transformer.get_submodule(f"{prefix}.{i}.{t}") for t in targets]
                with torch.no_grad():
                    want = _fused(old, x) + x @ down.T @ up.T  # UNO: qkv(x) + qkv_lora(x)
                    torch.testing.assert_close(_fused(new, x), want, rtol=1e-5, atol=1e-5)


def test_merge_changes_the_model_output(transformer: FluxTransformer2DModel) -> None:
    inputs = _inputs(transformer)
    with torch.no_grad():
        base = transformer(**inputs).sample
        merge_uno_lora(transformer, synthetic_uno_state_dict(transformer))
        merged = transformer(**inputs).sample
    assert (merged - base).abs().max() > 1e-3


def test_unknown_and_missing_keys_are_listed_and_nothing_changes(transformer: FluxTransformer2DModel) -> None:
    sd = synthetic_uno_state_dict(transformer)
    del sd["double_blocks.1.processor.proj_lora2.up.weight"]
    sd["double_blocks.7.processor.qkv_lora1.down.weight"] = torch.zeros(RANK, 32)  # past the 2 double blocks
    sd["single_blocks.0.processor.qkv_lora.alpha"] = torch.tensor(4.0)
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(UnoLoraError) as info:
        merge_uno_lora(transformer, sd)
    msg = str(info.value)
    assert "2 unknown key(s)" in msg and "double_blocks.7.processor.qkv_lora1.down.weight" in msg
    assert "single_blocks.0.processor.qkv_lora.alpha" in msg
    assert "1 missing key(s)" in msg and "double_blocks.1.processor.proj_lora2.up.weight" in msg
    assert all(torch.equal(v, transformer.state_dict()[k]) for k, v in weights.items())


def test_partial_blocks_need_require_all_blocks_false(transformer: FluxTransformer2DModel) -> None:
    sd = {k: v for k, v in synthetic_uno_state_dict(transformer).items() if k.startswith("double_blocks.1.")}
    with pytest.raises(UnoLoraError, match="missing key"):
        merge_uno_lora(transformer, sd)
    assert merge_uno_lora(transformer, sd, require_all_blocks=False) == 8
    del sd["double_blocks.1.processor.qkv_lora2.down.weight"]
    with pytest.raises(UnoLoraError, match=r"double_blocks.1.processor.qkv_lora2.down.weight"):
        merge_uno_lora(transformer, sd, require_all_blocks=False)


def test_lora_of_another_size_is_rejected(transformer: FluxTransformer2DModel) -> None:
    wide = FluxTransformer2DModel(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 6, 6))
    with pytest.raises(UnoLoraError, match="another FLUX size"):
        merge_uno_lora(transformer, synthetic_uno_state_dict(wide))


def test_file_loading_is_safetensors_only(transformer: FluxTransformer2DModel, tmp_path) -> None:
    sd = synthetic_uno_state_dict(transformer)
    save_file(sd, tmp_path / "dit_lora.safetensors")
    loaded = load_uno_lora_file(tmp_path / "dit_lora.safetensors")
    assert loaded.keys() == sd.keys()
    with pytest.raises(UnoLoraError, match="safetensors"):
        load_uno_lora_file(tmp_path / "dit_lora.bin")
    with pytest.raises(UnoLoraError, match="does not exist"):
        load_uno_lora_file(tmp_path / "missing.safetensors")


def test_peft_conversion_loads_in_flux_pipeline_like_the_merge(tmp_path) -> None:
    parts = tiny_flux_components(seed=0, guidance_embeds=False)
    pipe = FluxPipeline(**parts)
    sd = synthetic_uno_state_dict(pipe.transformer, seed=3)
    cfg = pipe.transformer.config
    peft_sd = uno_to_peft_state_dict(sd, cfg.num_layers, cfg.num_single_layers)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=peft_sd)
    inputs = _inputs(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        via_pipeline = pipe.transformer(**inputs).sample
    merged = tiny_flux_components(seed=0, guidance_embeds=False)["transformer"]
    merge_uno_lora(merged, sd)
    with torch.no_grad():
        torch.testing.assert_close(via_pipeline, merged(**inputs).sample, rtol=1e-4, atol=1e-5)


def _inputs(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 8, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 5, transformer.config.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.4]), "img_ids": torch.zeros(8, 3), "txt_ids": torch.zeros(5, 3)}


def uno_position_ids(grid: tuple[int, int], ref_grids: list[tuple[int, int]]) -> torch.Tensor:
    """UNO's rule (``prepare_multi_ip``, pe='d'): target at (0, i, j); reference k shifted by the running sums
    of the heights and of the widths before it, starting at the target's (h, w)."""
    def block(h: int, w: int, dh: int, dw: int) -> torch.Tensor:
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([torch.zeros_like(ii), ii + dh, jj + dw], -1).reshape(-1, 3)

    parts, (dh, dw) = [block(*grid, 0, 0)], grid
    for h, w in ref_grids:
        parts.append(block(h, w, dh, dw))
        dh, dw = dh + h, dw + w
    return torch.cat(parts)


@pytest.mark.parametrize("grid, refs", [((32, 32), [(32, 32)]), ((32, 32), [(20, 20), (20, 20)]),
                                        ((4, 4), [(2, 2), (3, 3), (1, 1)])])
def test_adapter_position_ids_are_unos_for_square_images(grid, refs) -> None:
    """The imported UNO LoRA was trained with UNO's reference positions: the adapter reproduces them for square
    targets and references (DreamBench's 512 px protocol; UNO's 320 px multi-reference crops)."""
    from focusdpo.backbones.flux import position_ids

    assert torch.equal(position_ids(grid, refs), uno_position_ids(grid, refs))
