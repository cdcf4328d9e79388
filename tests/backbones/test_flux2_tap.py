"""The focus tap of the FLUX.2 backbone: the attention field is the softmax mass each block really routes to each
reference, and tapping changes nothing about the prediction (bit-identical to diffusers' FLUX.2 processors)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from flux2_tiny import write_tiny_flux2_folder
from focusdpo.backbones import load_backbone
from focusdpo.config import LoraConfig, ModelConfig

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "to_qkv_mlp_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_tiny_flux2_folder(tmp_path_factory.mktemp("flux2"), seed=0))


@pytest.fixture()
def backbone(folder: str):
    return load_backbone(ModelConfig.of(backbone="flux2", checkpoint=folder, patch=16, max_text_tokens=64))


@torch.no_grad()
def _inputs(bb, b=2):
    g = torch.Generator().manual_seed(0)
    refs = [bb.encode_images(torch.rand(b, 3, 64, 64, generator=g)),
            bb.encode_images(torch.rand(b, 3, 64, 96, generator=g))]
    text = bb.encode_prompts(["a dog and a cat"] * b)
    return torch.randn(b, 16, 128, generator=g), torch.rand(b, generator=g), text, refs, (4, 4)


def _heads(attn, x):
    return x.unflatten(-1, (-1, attn.head_dim))


def _naive_field(attn, args, kwargs, text_len, n, refs, masks):
    """From one attention module's inputs: q and k by hand, the full softmax matrix, and each reference's
    mask-weighted column mass of the target rows, averaged over heads: ``[B, K, N]``."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    rope = kwargs["image_rotary_emb"]
    if hasattr(attn, "to_qkv_mlp_proj"):  # single block: fused q, k, v (+ MLP) over the joint sequence
        qkv = attn.to_qkv_mlp_proj(hidden)[..., : 3 * attn.inner_dim]
        q, k, _ = (_heads(attn, x) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
    else:
        enc = kwargs["encoder_hidden_states"]
        q = torch.cat([attn.norm_added_q(_heads(attn, attn.add_q_proj(enc))), attn.norm_q(_heads(attn, attn.to_q(
            hidden)))], 1)
        k = torch.cat([attn.norm_added_k(_heads(attn, attn.add_k_proj(enc))), attn.norm_k(_heads(attn, attn.to_k(
            hidden)))], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    probs = torch.einsum("blhd,bmhd->bhlm", q, k).div(attn.head_dim ** 0.5).softmax(-1)
    rows = probs[:, :, text_len:text_len + n]
    start, out = text_len + n, []
    for r, m in zip(refs, masks, strict=True):
        out.append((rows[..., start:start + r.tokens.shape[1]] * m[:, None, None, :]).sum(-1).mean(1))
        start += r.tokens.shape[1]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name,index", [("double:0", 0), ("double:1", 1), ("single:0", 2), ("single:1", 3)])
def test_field_is_the_softmax_mass_on_each_reference(backbone, name, index):
    x_t, t, text, refs, grid = _inputs(backbone)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(r.tokens.shape[:2], generator=g) for r in refs]
    tr = backbone.transformer
    attn = (list(tr.transformer_blocks) + list(tr.single_transformer_blocks))[index].attn
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    backbone.tap_layer = name
    try:
        with torch.no_grad():
            _, tap = backbone.predict(x_t, t, text, refs, grid, tap=True, ref_masks=masks)
            expected = _naive_field(attn, *seen[0], text.tokens.shape[1], 16, refs, masks)
    finally:
        handle.remove()
    assert tap.field.shape == (2, 2, 16)
    torch.testing.assert_close(tap.field, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(tap.blocks[name], tap.field)
    assert tap.target.shape == (2, 16, 32) and [r.shape[1] for r in tap.refs] == [16, 24]


def test_all_averages_blocks_and_unit_masks_give_masses_below_one(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.tap_layer = "all"
    with torch.no_grad():
        _, tap = backbone.predict(x_t, t, text, refs, grid, tap=True)
    total = tap.field.sum(dim=1)
    assert (tap.field >= 0).all() and (total > 0).all() and (total < 1).all()
    assert list(tap.blocks) == ["double:0", "double:1", "single:0", "single:1"]
    assert torch.allclose(tap.field, torch.stack(list(tap.blocks.values())).mean(0))
    with pytest.raises(ValueError, match="single:0..1"):
        backbone.tap_layer = "single:2"


def test_tapping_changes_nothing_and_equals_diffusers_processors(backbone):
    """Our processors are bit-identical to Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor, LoRA attached."""
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.add_lora(LoraConfig(rank=4, alpha=4.0, targets=TARGETS))
    with torch.no_grad():
        for p in backbone.transformer.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        ours, _ = backbone.predict(x_t, t, text, refs, grid)
        backbone.tap_layer = "all"
        tapped, _ = backbone.predict(x_t, t, text, refs, grid, tap=True)
        with backbone.reference():
            base, _ = backbone.predict(x_t, t, text, refs, grid)
        tr = backbone.transformer
        for block in tr.transformer_blocks:
            block.attn.set_processor(Flux2AttnProcessor())
        for block in tr.single_transformer_blocks:
            block.attn.set_processor(Flux2ParallelSelfAttnProcessor())
        theirs, _ = backbone.predict(x_t, t, text, refs, grid)
    assert torch.equal(ours, theirs) and torch.equal(tapped, theirs)
    assert (ours - base).abs().max() > 1e-3  # the LoRA (on both block kinds) matters


def test_tap_of_a_foreign_processor_is_refused(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.transformer.single_transformer_blocks[0].attn.processor.own = False
    backbone.tap_layer = "single:0"
    with pytest.raises(ValueError, match="needs diffusers' plain Flux2ParallelSelfAttnProcessor"):
        backbone.predict(x_t, t, text, refs, grid, tap=True)


def test_gradient_checkpointing_and_tap_give_the_same_gradients(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.add_lora(LoraConfig(rank=4, alpha=4.0, targets=TARGETS))
    backbone.tap_layer = "all"
    lora = [p for n, p in backbone.transformer.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora:
            p.add_(0.05)

    def grads():
        for p in lora:
            p.grad = None
        pred, tap = backbone.predict(x_t, t, text, refs, grid, tap=True)
        pred.pow(2).mean().backward()
        return [p.grad.clone() for p in lora], tap.field

    plain, field = grads()
    backbone.transformer.enable_gradient_checkpointing()
    checkpointed, field_ckpt = grads()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, checkpointed, strict=True))
    assert torch.equal(field, field_ckpt)
    assert any(g.abs().max() > 0 for g in plain)
