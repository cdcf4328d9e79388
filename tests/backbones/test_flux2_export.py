"""``focusdpo export-lora`` on a FLUX.2 run: the stock ``Flux2KleinPipeline`` with ``load_lora_weights`` and
``image=[refs]`` draws the same image as ``focusdpo sample --run`` (``load_method`` + ``generate``) with the same
seed, steps and guidance, with references and without.

Tolerance: ``atol = 5e-5`` on images in ``[0, 1]`` (float32 on the CPU). The two differ only in float rounding:
the pipeline passes ``timestep = (1000 sigma) / 1000`` and runs the conditional and unconditional forwards one
at a time where ``generate`` passes ``sigma`` and batches them; measured max differences 3.2e-6 (references) and
4.0e-6 (none). The LoRA moves the image by 0.04-0.05 (more than 100x the tolerance is asserted), so the test
cannot pass with the adapter ignored. The ``focusdpo sample`` command itself is checked on its 8-bit PNG.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from flux2_tiny import write_tiny_flux2_folder
from focusdpo.backbones.lora_export import WEIGHT_NAME
from focusdpo.cli import app
from focusdpo.config import Config, LoraConfig, ModelConfig, SampleConfig
from focusdpo.eval.methods import load_method
from focusdpo.lora import save_lora
from focusdpo.sampling import generate

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "to_qkv_mlp_proj"]
ATOL = 5e-5
PROMPT = "a dog and a cat"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_tiny_flux2_folder(tmp_path_factory.mktemp("flux2"), seed=0))


@pytest.fixture(scope="module")
def run_dir(folder: str, tmp_path_factory):
    """A finished run as ``focusdpo train`` leaves it: config.yaml + lora.safetensors (rank, alpha metadata)."""
    run = tmp_path_factory.mktemp("run")
    cfg = Config(model=ModelConfig.of(backbone="flux2", checkpoint=folder, patch=16, max_text_tokens=64),
                 lora=LoraConfig(rank=4, alpha=2.0, targets=TARGETS))
    (run / "config.yaml").write_text(cfg.to_yaml())
    bb = load_method(cfg, None)
    bb.add_lora(cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training (B starts at zero, which would make the test vacuous)
        for name, p in bb.transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_lora(run / "lora.safetensors", bb.lora_state_dict(), metadata={"rank": "4", "alpha": "2.0"})
    result = CliRunner().invoke(app, ["export-lora", str(run)])
    assert result.exit_code == 0, result.output
    return run


def _references() -> tuple[list[Image.Image], list[torch.Tensor]]:
    """Two reference photos (PIL for the pipeline, ``[1, 3, h, w]`` in [0, 1] for us), multiples of 16 px."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)]
    return ([Image.fromarray(a) for a in arrays],
            [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0 for a in arrays])


def _pipeline(pipe: Flux2KleinPipeline, pil: list[Image.Image] | None, sample: SampleConfig) -> torch.Tensor:
    return pipe(image=pil, prompt=PROMPT, height=64, width=64, num_inference_steps=sample.steps,
                guidance_scale=sample.guidance, generator=torch.Generator().manual_seed(sample.seed),
                output_type="pt", max_sequence_length=64).images


@pytest.mark.parametrize("with_refs", [True, False], ids=["refs", "no-refs"])
def test_stock_pipeline_with_the_exported_lora_draws_our_sample(folder: str, run_dir, with_refs: bool) -> None:
    pil, refs = _references() if with_refs else (None, [])
    sample = SampleConfig(steps=3, guidance=4.0, seed=7)
    cfg = Config.from_yaml((run_dir / "config.yaml").read_text())
    ours = generate(load_method(cfg, run_dir, check_world=False), [PROMPT], refs, (64, 64), sample)
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    base = _pipeline(pipe, pil, sample)
    pipe.load_lora_weights(str(run_dir))
    theirs = _pipeline(pipe, pil, sample)
    assert ours.shape == theirs.shape == (1, 3, 64, 64)
    assert (theirs - base).abs().max() > 100 * ATOL  # the adapter matters
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_exported_file_covers_both_block_kinds_with_the_scale_folded(run_dir) -> None:
    sd = load_file(run_dir / WEIGHT_NAME)
    ours = load_file(run_dir / "lora.safetensors")
    key = "single_transformer_blocks.1.attn.to_qkv_mlp_proj"
    assert f"transformer.{key}.lora_A.weight" in sd
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in sd
    assert len(sd) == 2 * (2 * 8 + 2 * 1)  # double blocks: 8 targets; single blocks: the fused projection
    torch.testing.assert_close(sd[f"transformer.{key}.lora_B.weight"], ours[f"{key}.lora_B.weight"] * 0.5)


def test_focusdpo_sample_command_draws_the_stock_pipelines_image(folder: str, run_dir, tmp_path) -> None:
    """The command itself: ``focusdpo sample --run --prompt --ref`` writes a PNG grid whose sample cell is the
    stock pipeline's image with the LoRA, to the 8-bit level (one level allowed where rounding straddles)."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"ref{i}.png")
    result = CliRunner().invoke(app, [
        "sample", "--run", str(run_dir), "--config", str(run_dir / "config.yaml"), "--prompt", PROMPT,
        "--ref", str(tmp_path / "ref0.png"), "--ref", str(tmp_path / "ref1.png"), "--ref-size", "64", "--size", "64",
        "--seed", "5", "--out", str(tmp_path / "grid.png"), "sample.steps=3", "sample.guidance=4.0"])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    ours = grid[2:66, 2 + 2 * 66: 2 + 2 * 66 + 64].astype(int)  # cells: ref0 | ref1 | sample, 2 px padding
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(run_dir))
    theirs = _pipeline(pipe, [Image.fromarray(a) for a in arrays], SampleConfig(steps=3, guidance=4.0, seed=5))
    theirs = (theirs[0].permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(ours - theirs).max() <= 1 and (ours == theirs).mean() > 0.99
