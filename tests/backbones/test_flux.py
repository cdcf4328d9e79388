"""The in-context tiny FLUX backbone: shapes, positions, the SPAF tap, LoRA switching, checkpoints."""

from __future__ import annotations

import pytest
import torch

from focusdpo.backbones import load_backbone
from focusdpo.backbones.base import Backbone, Tokens
from focusdpo.backbones.codecs import PixelCodec
from focusdpo.backbones.flux import build_tiny, position_ids, rope_axes, save_tiny
from focusdpo.backbones.text import TinyTextEncoder
from focusdpo.config import LoraConfig, ModelConfig
from focusdpo.losses import dpo_loss, token_errors, weighted_error

VOCAB = ["a", "ball", "box", "on", "the", "left", "right", "and", "sand"]
TINY = dict(patch=4, num_layers=2, num_single_layers=1, num_heads=2, head_dim=16, text_dim=16, max_text_tokens=16)


@pytest.fixture()
def backbone():
    torch.manual_seed(0)
    return build_tiny(ModelConfig.of(**TINY), VOCAB)


def _inputs(bb, b=2, ref_sizes=((16, 16),), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = bb.encode_images(torch.rand(b, 3, 32, 32, generator=g))
    refs = [bb.encode_images(torch.rand(b, 3, h, w, generator=g)) for h, w in ref_sizes]
    text = bb.encode_prompts(["a ball on the left and a box on the right on sand"] * b)
    x_t = torch.randn(x0.tokens.shape, generator=g)
    t = torch.rand(b, generator=g)
    return x_t, t, text, refs, x0.grid


def _perturb_lora(bb, scale=0.5):
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def test_pixel_codec_round_trip_and_token_layout():
    codec = PixelCodec(4)
    img = torch.rand(2, 3, 8, 12)
    tok = codec.encode(img)
    assert tok.grid == (2, 3) and tok.tokens.shape == (2, 6, 48)
    # token (row 1, col 2) holds pixels [4:8, 8:12], channel-major, scaled to [-1, 1]
    expected = img[:, :, 4:8, 8:12].reshape(2, -1) * 2 - 1
    assert torch.allclose(tok.tokens[:, 1 * 3 + 2], expected)
    assert torch.allclose(codec.decode(tok.tokens, tok.grid), img, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the codec patch 4"):
        codec.encode(torch.rand(1, 3, 10, 8))


def test_text_encoder_rejects_unknown_and_long_prompts():
    enc = TinyTextEncoder(VOCAB, dim=16, max_tokens=4)
    cond = enc.encode(["a ball", ""])
    assert cond.tokens.shape == (2, 4, 16) and cond.pooled.shape == (2, 16)
    assert enc.ids(["A ball, on"]).tolist() == [[1, 2, 4, 0]]
    with pytest.raises(ValueError, match="zebra"):
        enc.encode(["a zebra"])
    with pytest.raises(ValueError, match="max_text_tokens"):
        enc.encode(["a ball on the left"])


def test_rope_axes_sum_to_head_dim():
    for d in (16, 32, 64, 128):
        axes = rope_axes(d)
        assert sum(axes) == d and all(a % 2 == 0 for a in axes)
    assert rope_axes(128) == (16, 56, 56)


def test_position_ids_offsets_never_collide():
    ids = position_ids((4, 4), [(2, 2), (3, 1)])
    assert ids.shape == (16 + 4 + 3, 3)
    assert ids[:16].tolist()[5] == [0, 1, 1]
    assert ids[16].tolist() == [0, 4, 4]          # first reference starts at max(h, w) of the target
    assert ids[20].tolist() == [0, 6, 6]          # second after the first reference's max(h, w)
    rows = [tuple(r) for r in ids.tolist()]
    assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_predict_shapes_for_k_references_of_mixed_sizes(backbone, k):
    sizes = [(16, 16), (8, 16), (12, 8)][:k]
    x_t, t, text, refs, grid = _inputs(backbone, ref_sizes=sizes)
    pred, tap = backbone.predict(x_t, t, text, refs, grid, tap=True)
    assert pred.shape == x_t.shape == (2, 64, 48)
    assert tap.target.shape == (2, 64, 32) and not tap.target.requires_grad
    assert [r.shape for r in tap.refs] == [(2, h * w // 16, 32) for h, w in sizes]
    assert tap.field.shape == (2, k, 64) and tap.field.dtype == torch.float32
    assert isinstance(backbone, Backbone)


def test_predict_depends_on_references_and_prompt(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    base, _ = backbone.predict(x_t, t, text, refs, grid)
    other_ref = [Tokens(refs[0].tokens.flip(1), refs[0].grid)]
    assert not torch.allclose(base, backbone.predict(x_t, t, text, other_ref, grid)[0])
    empty = backbone.encode_prompts(["", ""])
    assert not torch.allclose(base, backbone.predict(x_t, t, empty, refs, grid)[0])


def test_tap_returns_the_blocks_real_hidden_states(backbone):
    """Recompute the image stream up to the tap block by hand and compare with the hook's capture."""
    x_t, t, text, refs, grid = _inputs(backbone, ref_sizes=((16, 16), (8, 8)))
    backbone.tap_layer = 1
    pred, tap = backbone.predict(x_t, t, text, refs, grid, tap=True)
    feats = torch.cat([tap.target, *tap.refs], dim=1)
    tr = backbone.transformer
    with torch.no_grad():
        hidden = tr.x_embedder(torch.cat([x_t] + [r.tokens for r in refs], dim=1))
        temb = tr.time_text_embed(t * 1000, text.pooled)
        enc = tr.context_embedder(text.tokens)
        ids = torch.cat([torch.zeros(text.tokens.shape[1], 3), position_ids(grid, [r.grid for r in refs])])
        rope = tr.pos_embed(ids)
        for block in tr.transformer_blocks[:2]:
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
    assert torch.allclose(feats, hidden, atol=1e-5)
    assert torch.equal(pred, backbone.predict(x_t, t, text, refs, grid, tap=False)[0])


def test_tap_layer_out_of_range_names_the_field(backbone):
    with pytest.raises(ValueError, match="focus.tap_layer=5"):
        backbone.tap_layer = 5
    for bad in ("single:1", "double:-1", "triple:0", "middle", ""):
        with pytest.raises(ValueError, match="allowed double:0..1, single:0..0, all"):
            backbone.tap_layer = bad
    backbone.tap_layer = None
    assert backbone.tap_blocks == ["double:1"]
    backbone.tap_layer = "ALL"
    assert backbone.tap_blocks == ["double:0", "double:1", "single:0"] and backbone.tap_layer == "all"


def test_reference_equals_base_and_restores_adapters_after_exception(backbone):
    x_t, t, text, refs, grid = _inputs(backbone)
    with torch.no_grad():
        base, _ = backbone.predict(x_t, t, text, refs, grid)
        backbone.add_lora(LoraConfig(rank=4, alpha=4.0))
        _perturb_lora(backbone)
        adapted, _ = backbone.predict(x_t, t, text, refs, grid)
        assert not torch.allclose(adapted, base, atol=1e-4)
        with backbone.reference():
            assert torch.allclose(backbone.predict(x_t, t, text, refs, grid)[0], base, atol=1e-6)
        with pytest.raises(RuntimeError, match="boom"), backbone.reference():
            raise RuntimeError("boom")
        assert torch.allclose(backbone.predict(x_t, t, text, refs, grid)[0], adapted, atol=1e-6)


def test_one_dpo_step_changes_only_lora_parameters(backbone):
    backbone.add_lora(LoraConfig(rank=4, alpha=4.0))
    before = {n: p.detach().clone() for n, p in backbone.transformer.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in backbone.text_encoder.named_parameters()}
    params = [p for p in backbone.trainable().parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in backbone.trainable().named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x_w, t, text, refs, grid = _inputs(backbone, seed=1)
    x_l = x_w + 0.3
    target = torch.randn_like(x_w)
    with torch.no_grad(), backbone.reference():
        ref_w = weighted_error(token_errors(backbone.predict(x_w, t, text, refs, grid)[0], target))
        ref_l = weighted_error(token_errors(backbone.predict(x_l, t, text, refs, grid)[0], target))
    err_w = weighted_error(token_errors(backbone.predict(x_w, t, text, refs, grid)[0], target))
    err_l = weighted_error(token_errors(backbone.predict(x_l, t, text, refs, grid)[0], target))
    loss, _ = dpo_loss(err_w, err_l, ref_w, ref_l, beta=100.0)
    loss.mean().backward()
    opt.step()
    changed = {n for n, p in backbone.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert all("lora_" in n for n in changed) and any("lora_B" in n for n in changed)
    assert all(torch.equal(p, text_before[n]) for n, p in backbone.text_encoder.named_parameters())


def test_lora_state_dict_round_trip(backbone, tmp_path):
    from focusdpo.lora import load_lora, save_lora

    backbone.add_lora(LoraConfig(rank=4, alpha=4.0))
    _perturb_lora(backbone)
    sd = backbone.lora_state_dict()
    assert sd and all(".default." not in k for k in sd)
    save_lora(tmp_path / "lora.safetensors", sd)
    torch.manual_seed(0)
    other = build_tiny(ModelConfig.of(**TINY), VOCAB)
    other.transformer.load_state_dict(backbone.transformer.state_dict(), strict=False)
    other.text_encoder.load_state_dict(backbone.text_encoder.state_dict())
    other.add_lora(LoraConfig(rank=4, alpha=4.0))
    other.load_lora_state_dict(load_lora(tmp_path / "lora.safetensors"))
    x_t, t, text, refs, grid = _inputs(backbone)
    with torch.no_grad():
        assert torch.allclose(other.predict(x_t, t, text, refs, grid)[0],
                              backbone.predict(x_t, t, text, refs, grid)[0], atol=1e-6)
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        other.load_lora_state_dict(bad)


def test_lora_unknown_target_names_the_field(backbone):
    with pytest.raises(ValueError, match="lora.targets"):
        backbone.add_lora(LoraConfig(targets=["to_q", "no_such_proj"]))


def test_checkpoint_round_trip_through_load_backbone(backbone, tmp_path):
    cfg = ModelConfig.of(**TINY)
    save_tiny(backbone, tmp_path / "model.safetensors", cfg)
    loaded = load_backbone(ModelConfig.of(**TINY, checkpoint=str(tmp_path)))
    x_t, t, text, refs, grid = _inputs(backbone)
    with torch.no_grad():
        assert torch.equal(loaded.predict(x_t, t, text, refs, grid)[0], backbone.predict(x_t, t, text, refs, grid)[0])
    assert loaded.text_encoder.vocabulary == VOCAB
    assert not any(p.requires_grad for p in loaded.trainable().parameters())
    with pytest.raises(ValueError, match="model.flux-tiny.num_layers=2"):
        load_backbone(ModelConfig.of(**{**TINY, "num_layers": 3}, checkpoint=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        load_backbone(ModelConfig.of(**TINY, checkpoint=str(tmp_path / "nowhere")))


def test_bf16_base_keeps_float32_adapters_and_trains():
    torch.manual_seed(0)
    bb = build_tiny(ModelConfig.of(**TINY, dtype="bfloat16"), VOCAB)
    assert bb.dtype == torch.bfloat16
    bb.add_lora(LoraConfig(rank=2, alpha=2.0))
    lora = [p for n, p in bb.transformer.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    x_t, t, text, refs, grid = _inputs(bb)
    pred, tap = bb.predict(x_t, t, text, refs, grid, tap=True)
    assert pred.dtype == torch.float32 and tap.target.dtype == torch.bfloat16 and tap.field.dtype == torch.float32
    assert torch.allclose(tap.field.sum(1), tap.field.sum(1).clamp(0, 1.01))  # masses, also from bf16 logits
    pred.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
