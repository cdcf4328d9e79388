"""Latents precomputed for a DIP set (``cache-latents``) and the ``export-lora`` command."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flux_tiny import tiny_flux_components, write_tiny_flux_folder
from focusdpo.backbones import load_backbone
from focusdpo.backbones.base import Tokens
from focusdpo.backbones.lora_export import WEIGHT_NAME
from focusdpo.backbones.vae import FluxVAECodec, LatentCache, cache_dataset_latents
from focusdpo.cli import app, cache_latents_command
from focusdpo.config import LoraConfig, load_config
from focusdpo.data.dataset import DipDataset
from focusdpo.lora import save_lora


def test_cache_dataset_latents_encodes_each_image_once(tmp_path) -> None:
    cache = LatentCache(FluxVAECodec(tiny_flux_components(seed=0)["vae"]), tmp_path)
    g = torch.Generator().manual_seed(0)
    items = [{"positive": torch.rand(3, 32, 48, generator=g), "negative": torch.rand(3, 32, 48, generator=g),
              "references": [torch.rand(3, 16, 16, generator=g)]} for _ in range(3)]
    items.append(dict(items[0]))  # a record repeating every image of the first
    seen = []
    # 9 distinct images encoded; the repeated record's 3 images are hits (their batches were written before)
    assert cache_dataset_latents(cache, items, batch_size=2, progress=lambda i, n: seen.append((i, n))) == (3, 9)
    assert seen[-1] == (4, 4)
    assert cache_dataset_latents(cache, items) == (12, 0)  # a second pass: every image is a hit
    # training-time encodes of a batch of these images hit the cache and equal the VAE's latents
    batch = torch.stack([items[1]["positive"], items[2]["positive"]])
    before = cache.misses
    assert torch.equal(cache.encode(batch).tokens, cache.codec.encode(batch).tokens)
    assert cache.misses == before


def test_cache_latents_command_fills_the_cache_the_loader_reads(tmp_path) -> None:
    from focusdpo.data import ensure_toy_dip

    folder = write_tiny_flux_folder(tmp_path / "flux", seed=0)
    cfg = load_config(None, [
        "world.scene_size=32", "world.ref_size=16", "world.n_identities=40", "world.max_subjects=2",
        "data.n_records=3", f"data.cache_dir={tmp_path / 'cache'}", "model.backbone=flux", f"model.checkpoint={folder}",
        "model.patch=16", "model.flux.guidance=4.0", "model.max_text_tokens=32", f"model.flux.latent_cache={tmp_path / 'lat'}"])
    cfg.data.path = str(ensure_toy_dip(cfg))
    counts = cache_latents_command(cfg, batch_size=4)
    hits, misses = counts["images"]
    assert hits == 0 and misses >= 3 * 3  # positive, negative and at least one reference per record
    n_prompts = len({DipDataset(cfg.data.path)[i]["prompt"] for i in range(3)})
    assert counts["prompts"] == (0, n_prompts)
    bb = load_backbone(cfg.model)
    item = DipDataset(cfg.data.path)[0]
    bb.encode_images(torch.stack([item["positive"], item["negative"]]))
    bb.encode_prompts([item["prompt"]])
    assert (bb.codec.hits, bb.codec.misses) == (2, 0)
    assert (bb.text_encoder.hits, bb.text_encoder.misses) == (1, 0)
    result = CliRunner().invoke(app, ["cache-latents", f"data.path={cfg.data.path}", "model.backbone=flux",
                                      f"model.checkpoint={folder}", "model.patch=16", "model.max_text_tokens=32",
                                      f"model.flux.latent_cache={tmp_path / 'lat'}"])
    assert result.exit_code == 0, result.output
    assert f"encoded 0 image(s) and 0 prompt(s); {misses} image(s) and {n_prompts} prompt(s)" in result.output


def test_export_lora_command(tmp_path) -> None:
    folder = write_tiny_flux_folder(tmp_path / "flux", seed=0)
    cfg = load_config(None, ["model.backbone=flux", f"model.checkpoint={folder}", "model.patch=16",
                             "model.flux.guidance=4.0"])
    bb = load_backbone(cfg.model)
    bb.add_lora(LoraConfig(rank=2, alpha=4.0))
    (tmp_path / "run").mkdir()
    save_lora(tmp_path / "run" / "lora.safetensors", bb.lora_state_dict(), metadata={"rank": "2", "alpha": "4.0"})
    result = CliRunner().invoke(app, ["export-lora", str(tmp_path / "run"), "--bf16"])
    assert result.exit_code == 0, result.output
    sd = load_file(tmp_path / "run" / WEIGHT_NAME)
    assert sd and all(k.startswith("transformer.") and v.dtype == torch.bfloat16 for k, v in sd.items())
    bad = CliRunner().invoke(app, ["export-lora", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "lora.safetensors not found" in bad.output


@pytest.mark.slow
def test_train_on_the_real_stack_then_load_the_export_in_flux_pipeline(tmp_path) -> None:
    """`focusdpo train` (2 steps) with model.backbone=flux, `export-lora`, FluxPipeline.load_lora_weights."""
    from diffusers import FluxPipeline

    from focusdpo.backbones.flux import position_ids
    from focusdpo.lora import load_lora
    from focusdpo.train.trainer import train

    folder = write_tiny_flux_folder(tmp_path / "flux", seed=0)
    cfg = load_config(None, [
        "world.scene_size=32", "world.ref_size=16", "world.n_identities=40", "world.max_subjects=2",
        "data.n_records=6", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=2", "model.backbone=flux",
        f"model.checkpoint={folder}", "model.patch=16", "model.flux.guidance=4.0", "model.max_text_tokens=32",
        f"model.flux.latent_cache={tmp_path / 'lat'}", "train.max_steps=2", "train.warmup_steps=0", "train.lr=0.01",
        "train.checkpoint_every=0", "train.val_records=2", "sample.steps=2", f"train.output_dir={tmp_path / 'run'}",
        "train.mixed_precision='no'", "lora.alpha=16"])
    run = train(cfg)
    result = CliRunner().invoke(app, ["export-lora", str(run)])
    assert result.exit_code == 0, result.output
    bb = load_backbone(cfg.model)
    bb.add_lora(cfg.lora)
    bb.load_lora_state_dict(load_lora(run / "lora.safetensors"))
    g = torch.Generator().manual_seed(0)
    x_t, ref = torch.randn(1, 4, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    text = bb.encode_prompts(["a red dog"])
    t = torch.tensor([0.6])
    with torch.no_grad():
        ours = bb.predict(x_t, t, text, [Tokens(ref, (1, 1))], (2, 2))[0]
        with bb.reference():
            base = bb.predict(x_t, t, text, [Tokens(ref, (1, 1))], (2, 2))[0]
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(run))
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=torch.cat([x_t, ref], 1), encoder_hidden_states=text.tokens,
                                  pooled_projections=text.pooled, timestep=t, img_ids=position_ids((2, 2), [(1, 1)]),
                                  txt_ids=torch.zeros(32, 3), guidance=torch.tensor([4.0]), return_dict=False)[0]
    assert (ours - base).abs().max() > 1e-4  # two steps at lr 0.01 moved the LoRA
    torch.testing.assert_close(theirs[:, :4], ours, rtol=1e-4, atol=1e-5)
