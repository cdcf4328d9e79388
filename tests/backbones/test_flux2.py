"""The FLUX.2 backbone against the stock ``Flux2KleinPipeline``: same position ids, latents, text features and
transformer output, loaded from a tiny folder written with ``save_pretrained`` through ``load_backbone``."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline

from flux2_tiny import write_tiny_flux2_folder
from focusdpo.backbones import load_backbone
from focusdpo.backbones.flux2 import position_ids, text_ids
from focusdpo.config import ModelConfig

MAX_TOKENS = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_tiny_flux2_folder(tmp_path_factory.mktemp("flux2"), seed=0))


@pytest.fixture(scope="module")
def pipe(folder: str) -> Flux2KleinPipeline:
    return Flux2KleinPipeline.from_pretrained(folder)


@pytest.fixture()
def backbone(folder: str):
    return load_backbone(ModelConfig.of(backbone="flux2", checkpoint=folder, patch=16, max_text_tokens=MAX_TOKENS))


def test_position_ids_equal_the_pipelines() -> None:
    """Target (0, i, j, 0), reference k at T = 10 + 10 k, text (0, 0, 0, l): the pipeline's own helpers."""
    grid, ref_grids = (3, 5), [(4, 4), (2, 6)]
    target = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, *grid))[0]
    refs = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 128, h, w) for h, w in ref_grids])[0]
    ours = position_ids(grid, ref_grids)
    assert torch.equal(ours, torch.cat([target, refs]))
    assert ours[15 + 16 + 7].tolist() == [20, 1, 1, 0]  # reference 2, row 1, column 1
    assert torch.equal(text_ids(7), Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 7, 3))[0])
    assert torch.equal(position_ids(grid, []), target)


def test_codec_equals_the_pipelines_latents_and_decoder(backbone, pipe) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 96, generator=g)
    tokens = backbone.encode_images(images)
    with torch.no_grad():
        latents = pipe._encode_vae_image(images * 2 - 1, generator=None)  # [B, 128, h, w], batch-normalised
        want = pipe._pack_latents(latents)
    assert tokens.grid == (4, 6) and tokens.tokens.shape == (2, 24, 128)
    torch.testing.assert_close(tokens.tokens, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the pipeline's decode path: scatter by ids, undo the batch norm, unpatchify, decode
        ids = pipe._prepare_latent_ids(latents)
        z = pipe._unpack_latents_with_ids(tokens.tokens, ids, 4, 6)
        bn = pipe.vae.bn
        z = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps) + bn.running_mean.view(
            1, -1, 1, 1)
        images_back = pipe.image_processor.postprocess(pipe.vae.decode(pipe._unpatchify_latents(z)).sample, "pt")
    torch.testing.assert_close(backbone.decode_tokens(tokens.tokens, tokens.grid), images_back, rtol=1e-5,
                               atol=1e-5)


def test_text_features_equal_the_pipelines_and_long_prompts_raise(backbone, pipe) -> None:
    prompts = ["a red dog on the grass", "a cat"]
    ours = backbone.encode_prompts(prompts)
    with torch.no_grad():
        want = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompts,
                                             max_sequence_length=MAX_TOKENS)
    assert ours.tokens.shape == (2, MAX_TOKENS, 48) and ours.pooled.shape == (2, 0)
    assert torch.equal(ours.tokens, want)
    with pytest.raises(ValueError, match="model.max_text_tokens=64"):
        backbone.encode_prompts(["a very long prompt " * 5])


def test_predict_equals_the_transformer_called_as_the_pipeline_does(backbone, pipe) -> None:
    g = torch.Generator().manual_seed(1)
    refs = [backbone.encode_images(torch.rand(1, 3, 64, 64, generator=g)),
            backbone.encode_images(torch.rand(1, 3, 64, 96, generator=g))]
    text = backbone.encode_prompts(["a dog and a cat"])
    x_t = torch.randn(1, 16, 128, generator=g)
    t = torch.tensor([0.7])
    with torch.no_grad():
        ours, _ = backbone.predict(x_t, t, text, refs, (4, 4))
        seq = torch.cat([x_t] + [r.tokens for r in refs], dim=1)
        img_ids = torch.cat([pipe._prepare_latent_ids(torch.zeros(1, 128, 4, 4)),
                             pipe._prepare_image_ids([torch.zeros(1, 128, 4, 4), torch.zeros(1, 128, 4, 6)])], 1)
        theirs = pipe.transformer(hidden_states=seq, timestep=t, guidance=None, encoder_hidden_states=text.tokens,
                                  txt_ids=pipe._prepare_text_ids(text.tokens), img_ids=img_ids,
                                  return_dict=False)[0][:, :16]
        alone, _ = backbone.predict(x_t, t, text, [], (4, 4))  # K = 0: text-to-image, as the pipeline allows
    assert torch.equal(ours, theirs)
    assert (alone - ours).abs().max() > 1e-4  # the references are attended to
    with pytest.raises(ValueError, match="needs K >= 1 references"):
        backbone.predict(x_t, t, text, [], (4, 4), tap=True)


def test_sampling_convention_is_the_pipelines(backbone, pipe) -> None:
    """Sigmas: the pipeline's timesteps / 1000 then 0; noise: ``randn(B, C, h, w)`` packed as the pipeline packs."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    sigmas = backbone.diffusion.sampling_sigmas(6, 24)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    timesteps, _ = retrieve_timesteps(scheduler, 6, "cpu", sigmas=[1 - i / 6 for i in range(6)],
                                      mu=compute_empirical_mu(24, 6))
    assert sigmas.shape == (7,) and sigmas[-1] == 0 and sigmas[0] == 1
    torch.testing.assert_close(sigmas[:-1], timesteps / 1000)
    assert sigmas[1] > 5 / 6  # shifted towards noise
    noise = backbone.diffusion.initial_noise(2, (4, 6), backbone.codec.channels, seed=3)
    latents, _ = pipe.prepare_latents(2, 32, 64, 96, torch.float32, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(noise, latents)


def test_loader_errors_name_the_field(folder: str) -> None:
    base = dict(backbone="flux2", checkpoint=folder, max_text_tokens=MAX_TOKENS)
    with pytest.raises(ValueError, match="set model.patch=16"):
        load_backbone(ModelConfig.of(**base, patch=8))
    with pytest.raises(ValueError, match="model.lora_import='uno.safetensors' belongs to backbone flux"):
        load_backbone(ModelConfig.of(**base, patch=16, lora_import="uno.safetensors"))
    with pytest.raises(ValueError, match="model.flux2.guidance=null"):
        load_backbone(ModelConfig.of(**base, patch=16, guidance=4.0))
    with pytest.raises(ValueError, match="model.checkpoint is required"):
        load_backbone(ModelConfig.of(backbone="flux2", patch=16))


def test_flux2_klein_yaml_loads_the_stack_with_caches(folder: str, tmp_path) -> None:
    """The shipped config pointed at the tiny folder; latents and Qwen3 features are cached and reused."""
    from pathlib import Path

    from focusdpo.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "flux2-klein.yaml", [
        f"model.checkpoint={folder}", f"model.flux2.latent_cache={tmp_path / 'latents'}", "model.dtype=float32"])
    assert (cfg.model.backbone, cfg.model.patch, cfg.model.options.guidance) == ("flux2", 16, None)
    bb = load_backbone(cfg.model)
    bb.add_lora(cfg.lora)  # the yaml's targets exist in both block kinds
    assert bb.transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj.lora_A["default"].weight.shape[0] == 16
    images = torch.rand(1, 3, 64, 64)
    first, again = bb.encode_images(images), bb.encode_images(images)
    text, text_again = bb.encode_prompts(["a cat"]), bb.encode_prompts(["a cat"])
    assert (bb.codec.hits, bb.codec.misses, bb.text_encoder.hits, bb.text_encoder.misses) == (1, 1, 1, 1)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(text.tokens, text_again.tokens)
    assert text_again.pooled.shape == (1, 0) and text.tokens.shape == (1, 512, 48)


def test_focusdpo_step_at_lora_init_is_log_2(backbone) -> None:
    """The trainer's step on the FLUX.2 stack: policy == reference at B = 0, so the loss is exactly log 2, with the
    focus computed from the FLUX.2 tap on the [positive; negative] batch."""
    import math

    from test_real_step import dip_batch

    from focusdpo.config import Config, LoraConfig, TrainConfig
    from focusdpo.train.step import NoiseKey, pair_step

    cfg = Config(model=ModelConfig.of(backbone="flux2", patch=16), lora=LoraConfig(rank=4, alpha=4.0),
                 train=TrainConfig(objective="focusdpo"))
    backbone.add_lora(cfg.lora)
    batch = dip_batch(size=64, ref=32)
    batch["prompt"] = ["a dog and a cat", "a toy"]
    out = pair_step(backbone.predict, backbone, batch, NoiseKey(seed=0, step=0), cfg)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.focus is not None and out.focus.W.shape == (2, 16)
    assert torch.all((out.metrics["a"] >= 0) & (out.metrics["a"] <= 1))
