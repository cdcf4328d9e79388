"""The focus tap of the FLUX backbone: the attention field is the softmax mass the model really routes to each
reference, computed in the same forward, and tapping changes nothing about the prediction."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from focusdpo.backbones.flux import build_tiny, position_ids
from focusdpo.backbones.flux_tap import parse_tap_layer
from focusdpo.config import LoraConfig, ModelConfig

VOCAB = ["a", "ball", "box", "on", "the", "left", "right", "and", "sand"]
TINY = dict(patch=4, num_layers=2, num_single_layers=2, num_heads=2, head_dim=16, text_dim=16, max_text_tokens=16)


@pytest.fixture()
def backbone():
    torch.manual_seed(0)
    return build_tiny(ModelConfig.of(**TINY), VOCAB)


@torch.no_grad()
def _inputs(bb, b=2, ref_sizes=((16, 16), (8, 16)), seed=0):
    g = torch.Generator().manual_seed(seed)
    refs = [bb.encode_images(torch.rand(b, 3, h, w, generator=g)) for h, w in ref_sizes]
    text = bb.encode_prompts(["a ball on the left and a box on the right"] * b)
    x_t = torch.randn(b, 64, 48, generator=g)
    return x_t, torch.rand(b, generator=g), text, refs, (8, 8)


def _naive_field(bb, block_index, x_t, t, text, refs, grid, masks):
    """Run the blocks by hand up to ``block_index`` (double blocks first), build the full softmax matrix of that
    block's attention and sum its target rows over each reference's (mask-weighted) columns: ``[B, K, N]``."""
    from diffusers.models.embeddings import apply_rotary_emb

    tr = bb.transformer

    def heads(x):
        return x.unflatten(-1, (-1, tr.transformer_blocks[0].attn.head_dim))

    hidden = tr.x_embedder(torch.cat([x_t] + [r.tokens for r in refs], dim=1))
    temb = tr.time_text_embed(t * 1000, text.pooled)
    enc = tr.context_embedder(text.tokens)
    ids = torch.cat([torch.zeros(text.tokens.shape[1], 3), position_ids(grid, [r.grid for r in refs])])
    rope = tr.pos_embed(ids)
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    n_double, length_txt = len(tr.transformer_blocks), text.tokens.shape[1]
    for i, block in enumerate(blocks):
        if i == block_index:
            attn = block.attn
            if i < n_double:
                normed = block.norm1(hidden, emb=temb)[0]
                normed_txt = block.norm1_context(enc, emb=temb)[0]
                q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(normed_txt))),
                               attn.norm_q(heads(attn.to_q(normed)))], 1)
                k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(normed_txt))),
                               attn.norm_k(heads(attn.to_k(normed)))], 1)
            else:
                joint = torch.cat([enc, hidden], dim=1)
                normed = block.norm(joint, emb=temb)[0]
                q, k = attn.norm_q(heads(attn.to_q(normed))), attn.norm_k(heads(attn.to_k(normed)))
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            probs = torch.einsum("blhd,bmhd->bhlm", q, k).div(attn.head_dim ** 0.5).softmax(-1)  # full matrix
            n = x_t.shape[1]
            rows = probs[:, :, length_txt:length_txt + n]  # [B, H, N, L]
            start, out = length_txt + n, []
            for r, m in zip(refs, masks, strict=True):
                cols = rows[..., start:start + r.tokens.shape[1]]
                out.append((cols * m[:, None, None, :]).sum(-1).mean(1))  # [B, N]
                start += r.tokens.shape[1]
            return torch.stack(out, dim=1)
        if i < n_double:
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
        else:
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
    raise AssertionError("block not reached")


@pytest.mark.parametrize("name,index", [("double:0", 0), ("double:1", 1), ("single:0", 2), ("single:1", 3)])
def test_field_is_the_softmax_mass_on_each_reference(backbone, name, index):
    x_t, t, text, refs, grid = _inputs(backbone)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(r.tokens.shape[:2], generator=g) for r in refs]  # soft masks weigh the columns
    backbone.tap_layer = name
    with torch.no_grad():
        _, tap = backbone.predict(x_t, t, text, refs, grid, tap=True, ref_masks=masks)
        expected = _naive_field(backbone, index, x_t, t, text, refs, grid, masks)
    assert tap.field.shape == (2, 2, 64)
    assert torch.allclose(tap.field, expected, atol=1e-5)
    assert torch.equal(tap.blocks[name], tap.field)


def test_unit_masks_give_masses_that_sum_below_one_and_all_averages_blocks(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.tap_layer = "all"
    with torch.no_grad():
        _, tap = backbone.predict(x_t, t, text, refs, grid, tap=True)
    total = tap.field.sum(dim=1)  # mass on every reference; the rest goes to text and target keys
    assert (tap.field >= 0).all() and (total > 0).all() and (total < 1).all()
    assert list(tap.blocks) == ["double:0", "double:1", "single:0", "single:1"]
    assert torch.allclose(tap.field, torch.stack(list(tap.blocks.values())).mean(0))
    singles = []  # the hidden states of "all" are the mean of each block's own, kept as a running sum
    for name in tap.blocks:
        backbone.tap_layer = name
        with torch.no_grad():
            singles.append(backbone.predict(x_t, t, text, refs, grid, tap=True)[1].target)
    assert torch.allclose(tap.target, torch.stack(singles).mean(0), atol=1e-6)


def test_tapping_changes_nothing_and_equals_diffusers_processor(backbone):
    """The tap's own attention is bit-identical to diffusers' FluxAttnProcessor, with and without LoRA."""
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.add_lora(LoraConfig(rank=4, alpha=4.0))
    with torch.no_grad():
        for p in backbone.transformer.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        ours, _ = backbone.predict(x_t, t, text, refs, grid)
        backbone.tap_layer = "all"
        tapped, _ = backbone.predict(x_t, t, text, refs, grid, tap=True)
        tr = backbone.transformer
        for block in list(tr.transformer_blocks) + list(tr.single_transformer_blocks):
            block.attn.set_processor(FluxAttnProcessor())
        theirs, _ = backbone.predict(x_t, t, text, refs, grid)
    assert torch.equal(ours, theirs) and torch.equal(tapped, theirs)


def test_tap_of_a_foreign_processor_is_refused(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.transformer.transformer_blocks[0].attn.processor.own = False
    backbone.tap_layer = "double:0"
    with pytest.raises(ValueError, match="needs diffusers' plain FluxAttnProcessor"):
        backbone.predict(x_t, t, text, refs, grid, tap=True)
    backbone.predict(x_t, t, text, refs, grid)  # untapped: the foreign processor just runs


def test_gradient_checkpointing_and_tap_give_the_same_gradients(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    backbone.add_lora(LoraConfig(rank=4, alpha=4.0))
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
    backbone.transformer.train()
    ckpt, field_ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt, strict=True))
    assert torch.equal(field, field_ckpt)


def test_parse_tap_layer():
    assert parse_tap_layer(None, 19, 38) == ["double:9"]
    assert parse_tap_layer(3, 19, 38) == ["double:3"]
    assert parse_tap_layer("single:37", 19, 38) == ["single:37"]
    assert len(parse_tap_layer("all", 19, 38)) == 57
    with pytest.raises(ValueError, match="focus.tap_layer=single:38 is invalid"):
        parse_tap_layer("single:38", 19, 38)
    with pytest.raises(ValueError, match="focus.tap_layer=True is invalid"):
        parse_tap_layer(True, 19, 38)
