"""End to end on a tiny FLUX.2 [klein] folder: toy DIP set at FLUX.2's token size -> ``cache-latents`` ->
``train`` (FocusDPO with the attention-field focus, 2 steps) -> ``export-lora`` -> the stock
``Flux2KleinPipeline`` with the exported LoRA and the record's references draws what ``focusdpo sample --run``
draws (``load_method`` + ``generate``; tolerance as in ``test_flux2_export.py``)."""

from __future__ import annotations

import csv
import math

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from typer.testing import CliRunner

from flux2_tiny import write_tiny_flux2_folder
from focusdpo.cli import app
from focusdpo.config import load_config
from focusdpo.data.dataset import DipDataset
from focusdpo.eval.methods import load_method
from focusdpo.sampling import generate

ATOL = 5e-5
MODEL = ["model.backbone=flux2", "model.patch=16", "model.max_text_tokens=192"]


def _pil(image: torch.Tensor) -> Image.Image:
    """``[3, h, w]`` in [0, 1] read from PNG (multiples of 1/255) -> the same pixels as a PIL image."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_dip_cache_train_export_then_stock_pipeline_generation(tmp_path) -> None:
    from focusdpo.data import ensure_toy_dip
    from focusdpo.train.trainer import train

    folder = write_tiny_flux2_folder(tmp_path / "flux2", seed=0)
    model = MODEL + [f"model.checkpoint={folder}", f"model.latent_cache={tmp_path / 'lat'}"]
    cfg = load_config(None, model + [
        "world.scene_size=64", "world.ref_size=64", "world.n_identities=40", "world.max_subjects=2",
        "data.n_records=4", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=2", "train.max_steps=2",
        "train.warmup_steps=0", "train.lr=0.01", "train.checkpoint_every=0", "train.val_records=1",
        "sample.steps=2", f"train.output_dir={tmp_path / 'run'}", "train.mixed_precision='no'", "lora.alpha=16",
        "lora.targets=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,to_qkv_mlp_proj]"])
    cfg.data.path = str(ensure_toy_dip(cfg))
    cached = CliRunner().invoke(app, ["cache-latents", f"data.path={cfg.data.path}", *model])
    assert cached.exit_code == 0 and "encoded" in cached.output, cached.output

    run = train(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert 0 <= float(rows[0]["a"]) <= 1  # the FLUX.2 attention field fed SPAF's alignment
    exported = CliRunner().invoke(app, ["export-lora", str(run)])
    assert exported.exit_code == 0, exported.output

    record = DipDataset(cfg.data.path)[0]
    refs = [r[None] for r in record["references"]]
    sample = cfg.sample
    ours = generate(load_method(cfg, run, check_world=False), [record["prompt"]], refs, (64, 64), sample)
    pipe = Flux2KleinPipeline.from_pretrained(str(folder))

    def stock() -> torch.Tensor:
        return pipe(image=[_pil(r) for r in record["references"]], prompt=record["prompt"], height=64, width=64,
                    num_inference_steps=sample.steps, guidance_scale=sample.guidance,
                    generator=torch.Generator().manual_seed(sample.seed), output_type="pt",
                    max_sequence_length=cfg.model.max_text_tokens).images

    base = stock()
    pipe.load_lora_weights(str(run))
    theirs = stock()
    assert (theirs - base).abs().max() > 10 * ATOL  # two steps at lr 0.01 moved the LoRA
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
