"""The full FLUX loader on a tiny diffusers folder written locally (save_pretrained -> load_backbone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from flux_tiny import synthetic_uno_state_dict, write_tiny_flux_folder
from focusdpo.backbones import load_backbone
from focusdpo.backbones.base import Backbone
from focusdpo.backbones.flux_text import FluxTextEncoder, TextCache
from focusdpo.backbones.uno import merge_uno_lora
from focusdpo.backbones.vae import FluxVAECodec, LatentCache
from focusdpo.config import ModelConfig, load_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_tiny_flux_folder(tmp_path_factory.mktemp("flux"), seed=0))


def _cfg(folder: str, **kw) -> ModelConfig:
    base = {"backbone": "flux", "checkpoint": folder, "guidance": 4.0, "max_text_tokens": 16, "patch": 16}
    return ModelConfig.of(**{**base, **kw})


def test_load_backbone_gives_the_saved_frozen_models(folder: str) -> None:
    bb = load_backbone(_cfg(folder))
    assert isinstance(bb, Backbone)
    assert isinstance(bb.codec, FluxVAECodec) and isinstance(bb.text_encoder, FluxTextEncoder)
    assert bb.patch == 16 and bb.guidance == 4.0 and bb.tap_layer == "double:1"
    saved = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    for (name, p), (_, q) in zip(bb.transformer.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in bb.transformer.parameters())


def test_encode_predict_decode_shapes(folder: str) -> None:
    bb = load_backbone(_cfg(folder))
    tgt = bb.encode_images(torch.rand(2, 3, 64, 32))
    refs = [bb.encode_images(torch.rand(2, 3, 32, 32)), bb.encode_images(torch.rand(2, 3, 16, 48))]
    assert tgt.tokens.shape == (2, 8, 64) and tgt.grid == (4, 2)
    text = bb.encode_prompts(["a red dog", "a blue cat on the grass"])
    bb.tap_layer = "all"  # the real FLUX stack: the attention field of every block, double and single
    pred, tap = bb.predict(torch.randn(2, 8, 64), torch.tensor([0.2, 0.9]), text, refs, tgt.grid, tap=True)
    assert pred.shape == (2, 8, 64) and tap.target.shape == (2, 8, 32) and [r.shape[1] for r in tap.refs] == [4, 3]
    assert tap.field.shape == (2, 2, 8) and ((tap.field > 0) & (tap.field.sum(1) < 1)).all()
    assert torch.isfinite(pred).all()
    assert bb.decode_tokens(tgt.tokens, tgt.grid).shape == (2, 3, 64, 32)


def test_guidance_must_match_the_model(folder: str, tmp_path) -> None:
    with pytest.raises(ValueError, match="set model.flux.guidance"):
        load_backbone(_cfg(folder, guidance=None))
    plain = write_tiny_flux_folder(tmp_path, seed=0, guidance_embeds=False)
    with pytest.raises(ValueError, match="model.flux.guidance=null"):
        load_backbone(_cfg(str(plain)))
    assert load_backbone(_cfg(str(plain), guidance=None)).guidance is None


def test_checkpoint_is_required_and_patch_must_be_the_vae_token_size(folder: str) -> None:
    with pytest.raises(ValueError, match="model.checkpoint is required"):
        load_backbone(ModelConfig.of(backbone="flux", guidance=4.0))
    with pytest.raises(ValueError, match="set model.patch=16"):
        load_backbone(_cfg(folder, patch=4))


def test_flux_uno_yaml_loads_the_stack(folder: str, tmp_path) -> None:
    """The shipped config, with its paths pointed at the tiny folder and a synthetic UNO file."""
    base = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    save_file(synthetic_uno_state_dict(base, seed=2), tmp_path / "dit_lora.safetensors")
    cfg = load_config(Path(__file__).parents[2] / "configs" / "flux-uno.yaml", [
        f"model.checkpoint={folder}", f"model.flux.lora_import={tmp_path / 'dit_lora.safetensors'}",
        f"model.flux.latent_cache={tmp_path / 'latents'}"])
    assert (cfg.model.backbone, cfg.model.patch, cfg.model.options.guidance, cfg.model.dtype) == ("flux", 16, 4.0, "bfloat16")
    bb = load_backbone(cfg.model)
    assert isinstance(bb.codec, LatentCache) and bb.text_encoder.encoder.max_tokens == 512
    assert not torch.equal(bb.transformer.transformer_blocks[0].attn.to_q.weight,
                           base.transformer_blocks[0].attn.to_q.weight.to(torch.bfloat16))


def test_uno_lora_import_is_merged_on_load(folder: str, tmp_path) -> None:
    base = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    sd = synthetic_uno_state_dict(base, seed=5)
    save_file(sd, tmp_path / "dit_lora.safetensors")
    bb = load_backbone(_cfg(folder, lora_import=str(tmp_path / "dit_lora.safetensors")))
    merge_uno_lora(base, sd)
    for (name, p), (_, q) in zip(bb.transformer.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_offload_and_latent_cache_options(folder: str, tmp_path) -> None:
    bb = load_backbone(_cfg(folder, offload_encoders=True, latent_cache=str(tmp_path / "latents")))
    assert isinstance(bb.codec, LatentCache) and isinstance(bb.text_encoder, TextCache)
    assert bb.codec.codec.offload and bb.text_encoder.encoder.offload
    img = torch.rand(1, 3, 32, 32)
    first, second = bb.encode_images(img), bb.encode_images(img)
    assert (bb.codec.hits, bb.codec.misses) == (1, 1)
    torch.testing.assert_close(first.tokens, second.tokens)
    bb.encode_prompts(["a red dog"])
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) == 2  # one image, one prompt


def test_bfloat16_weights(folder: str) -> None:
    bb = load_backbone(_cfg(folder, dtype="bfloat16"))
    assert bb.dtype == torch.bfloat16 and bb.codec.dtype == torch.bfloat16
    tgt = bb.encode_images(torch.rand(1, 3, 32, 32))
    assert tgt.tokens.dtype == torch.float32  # latents keep full precision; the transformer casts its input
    pred, _ = bb.predict(tgt.tokens, torch.tensor([0.5]), bb.encode_prompts(["a dog"]), [tgt], tgt.grid)
    assert pred.dtype == torch.float32 and torch.isfinite(pred).all()


def test_sampler_generates_with_the_real_stack(folder: str) -> None:
    from focusdpo.config import SampleConfig
    from focusdpo.sampling import generate

    bb = load_backbone(_cfg(folder))
    refs = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    cfg = SampleConfig(steps=1, guidance=2.0)  # guidance != 1 also encodes the empty prompt
    a = generate(bb, ["a red dog", "a cat"], refs, (32, 48), cfg, seed=3)
    assert a.shape == (2, 3, 32, 48) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(generate(bb, ["a red dog", "a cat"], refs, (32, 48), cfg, seed=3), a)
    assert not torch.allclose(generate(bb, ["a red dog", "a cat"], refs, (32, 48), cfg, seed=4), a)
