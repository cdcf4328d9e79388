"""End to end on a tiny FLUX.2 [klein] folder: a DIP set at FLUX.2's token size (the toy world; or a JSONL manifest
of the shared DreamBench photos through ``focusdpo dip build --manifest``) -> ``cache-latents`` -> ``train``
(FocusDPO with the attention-field focus, 2 steps) -> ``export-lora`` -> the stock ``Flux2KleinPipeline`` with the
exported LoRA and the record's references draws what ``focusdpo sample --run`` draws (``load_method`` +
``generate``; tolerance as in ``test_flux2_export.py``)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from typer.testing import CliRunner

from flux2_tiny import write_tiny_flux2_folder
from focusdpo.cli import app
from focusdpo.config import Config, load_config
from focusdpo.data.dataset import DipDataset
from focusdpo.eval.methods import load_method
from focusdpo.sampling import generate
from shared_data import DREAMBENCH, needs_dreambench

ATOL = 5e-5
MODEL = ["model.backbone=flux2", "model.patch=16", "model.max_text_tokens=192"]
TRAIN = ["data.batch_size=2", "train.max_steps=2", "train.warmup_steps=0", "train.lr=0.01", "train.checkpoint_every=0",
         "train.val_records=1", "sample.steps=2", "train.mixed_precision='no'", "lora.alpha=16",
         "lora.targets=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,to_qkv_mlp_proj]"]


def _pil(image: torch.Tensor) -> Image.Image:
    """``[3, h, w]`` in [0, 1] read from PNG (multiples of 1/255) -> the same pixels as a PIL image."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _cache_train_export_and_compare(cfg: Config, model: list[str], folder: Path) -> None:
    """``cache-latents`` -> ``train`` -> ``export-lora`` -> stock pipeline vs ``generate`` on record 0."""
    from focusdpo.train.trainer import train

    cached = CliRunner().invoke(app, ["cache-latents", f"data.path={cfg.data.path}", *model])
    assert cached.exit_code == 0 and "encoded" in cached.output, cached.output
    run = train(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert 0 <= float(rows[0]["a"]) <= 1  # the FLUX.2 attention field fed SPAF's alignment
    exported = CliRunner().invoke(app, ["export-lora", str(run)])
    assert exported.exit_code == 0, exported.output

    record = DipDataset(cfg.data.path)[0]
    refs, (h, w) = [r[None] for r in record["references"]], record["positive"].shape[-2:]
    sample = cfg.sample
    ours = generate(load_method(cfg, run, check_world=False), [record["prompt"]], refs, (h, w), sample)
    pipe = Flux2KleinPipeline.from_pretrained(str(folder))

    def stock() -> torch.Tensor:
        return pipe(image=[_pil(r) for r in record["references"]], prompt=record["prompt"], height=h, width=w,
                    num_inference_steps=sample.steps, guidance_scale=sample.guidance,
                    generator=torch.Generator().manual_seed(sample.seed), output_type="pt",
                    max_sequence_length=cfg.model.max_text_tokens).images

    base = stock()
    pipe.load_lora_weights(str(run))
    theirs = stock()
    assert (theirs - base).abs().max() > 10 * ATOL  # two steps at lr 0.01 moved the LoRA
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_toy_dip_cache_train_export_then_stock_pipeline_generation(tmp_path) -> None:
    from focusdpo.data import ensure_toy_dip

    folder = write_tiny_flux2_folder(tmp_path / "flux2", seed=0)
    model = MODEL + [f"model.checkpoint={folder}", f"model.flux2.latent_cache={tmp_path / 'lat'}"]
    cfg = load_config(None, model + TRAIN + [
        "world.scene_size=64", "world.ref_size=64", "world.n_identities=40", "world.max_subjects=2",
        "data.n_records=4", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}"])
    cfg.data.path = str(ensure_toy_dip(cfg))
    _cache_train_export_and_compare(cfg, model, folder)


@needs_dreambench
def test_dreambench_manifest_dip_build_then_train_export_and_stock_pipeline(tmp_path) -> None:
    """``focusdpo dip build --manifest``: one-subject records of the shared DreamBench photos (target and reference:
    two photos of the subject; the target's subject mask a centre box), resized to 64 px."""
    lines = []
    for subject in ("dog", "cat", "backpack", "clock"):
        for name in ("00.jpg", "01.jpg"):  # the photos beside the manifest: paths relative to its folder
            (tmp_path / subject).mkdir(exist_ok=True)
            shutil.copy(DREAMBENCH / "dataset" / subject / name, tmp_path / subject / name)
        with Image.open(tmp_path / subject / "00.jpg") as im:
            mask = np.zeros((im.height, im.width), dtype=np.uint8)
        mask[mask.shape[0] // 4: 3 * mask.shape[0] // 4, mask.shape[1] // 4: 3 * mask.shape[1] // 4] = 255
        Image.fromarray(mask).save(tmp_path / subject / "mask.png")
        lines.append({"id": subject, "prompt": f"a {subject} on the beach", "target": f"{subject}/00.jpg",
                      "target_masks": [f"{subject}/mask.png"], "references": [{"image": f"{subject}/01.jpg"}]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    folder = write_tiny_flux2_folder(tmp_path / "flux2", seed=0)
    model = MODEL + [f"model.checkpoint={folder}", f"model.flux2.latent_cache={tmp_path / 'lat'}"]
    disruptions = "data.disruptions={detail_erase: 1.0, patch_shuffle: 1.0}"
    built = CliRunner().invoke(app, ["dip", "build", "--manifest", str(tmp_path / "m.jsonl"), "--patch", "16",
                                     "--size", "64", "--ref-size", "64", "--out", str(tmp_path / "dip"), *model,
                                     disruptions])
    assert built.exit_code == 0, built.output
    assert len(DipDataset(tmp_path / "dip")) == 4
    cfg = load_config(None, model + TRAIN + [f"data.path={tmp_path / 'dip'}", f"train.output_dir={tmp_path / 'run'}",
                                             disruptions])
    _cache_train_export_and_compare(cfg, model, folder)
