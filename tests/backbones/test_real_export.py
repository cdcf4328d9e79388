"""LoRA export round trip: ``FluxPipeline.load_lora_weights(run_dir)`` reproduces our adapter's output."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from flux_tiny import write_tiny_flux_folder
from focusdpo.backbones import load_backbone
from focusdpo.backbones.flux import position_ids
from focusdpo.backbones.lora_export import (
    WEIGHT_NAME,
    diffusers_lora_state_dict,
    export_diffusers_lora,
    export_run,
    scaled_lora_state_dict,
)
from focusdpo.config import LoraConfig, ModelConfig
from focusdpo.lora import save_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_tiny_flux_folder(tmp_path_factory.mktemp("flux"), seed=0))


def _trained_backbone(folder: str, rank: int = 4, alpha: float = 8.0):
    bb = load_backbone(ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16,
                                   patch=16))
    bb.add_lora(LoraConfig(rank=rank, alpha=alpha, targets=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: B starts at zero, which would make the test vacuous
        for name, p in bb.transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bb


def _inputs(bb):
    torch.manual_seed(0)
    tgt = bb.encode_images(torch.rand(2, 3, 32, 48))
    refs = [bb.encode_images(torch.rand(2, 3, 32, 32)), bb.encode_images(torch.rand(2, 3, 16, 16))]
    text = bb.encode_prompts(["a red dog on the grass", "a striped cat"])
    return torch.randn_like(tgt.tokens), torch.tensor([0.3, 0.8]), text, refs, tgt.grid


def _pipeline_predict(pipe: FluxPipeline, x_t, t, text, refs, grid) -> torch.Tensor:
    """The pipeline's transformer on the in-context sequence our adapter builds (same ids, guidance)."""
    seq = torch.cat([x_t] + [r.tokens for r in refs], dim=1)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=seq, encoder_hidden_states=text.tokens, pooled_projections=text.pooled,
                               timestep=t, img_ids=position_ids(grid, [r.grid for r in refs]),
                               txt_ids=torch.zeros(text.tokens.shape[1], 3), guidance=torch.full((len(t),), 4.0),
                               return_dict=False)[0]
    return out[:, : x_t.shape[1]]


def test_pipeline_load_lora_weights_reproduces_the_adapter(folder: str, tmp_path) -> None:
    bb = _trained_backbone(folder)
    x_t, t, text, refs, grid = _inputs(bb)
    with torch.no_grad():
        ours, _ = bb.predict(x_t, t, text, refs, grid)
        with bb.reference():
            base, _ = bb.predict(x_t, t, text, refs, grid)
    path = export_diffusers_lora(bb.trainable(), tmp_path / "run")
    assert path == tmp_path / "run" / WEIGHT_NAME
    pipe = FluxPipeline.from_pretrained(folder)
    torch.testing.assert_close(_pipeline_predict(pipe, x_t, t, text, refs, grid), base, rtol=1e-4, atol=1e-5)
    pipe.load_lora_weights(str(tmp_path / "run"))
    theirs = _pipeline_predict(pipe, x_t, t, text, refs, grid)
    assert (ours - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_file_uses_diffusers_names_and_folds_the_scale(folder: str, tmp_path) -> None:
    bb = _trained_backbone(folder, rank=4, alpha=2.0)
    export_diffusers_lora(bb.trainable(), tmp_path)
    sd = load_file(tmp_path / WEIGHT_NAME)
    a = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    b = "transformer.single_transformer_blocks.1.proj_out"
    assert a in sd and f"{b}.lora_B.weight" in sd
    assert not any(".default." in k or "base_model" in k for k in sd)
    n_layers = 2 * 8 + 2 * 4 + 1  # double: 8 targets; single: q, k, v, proj_out; the final proj_out
    assert len(sd) == 2 * n_layers
    layer = bb.transformer.get_submodule("single_transformer_blocks.1.proj_out")
    torch.testing.assert_close(sd[f"{b}.lora_B.weight"], layer.lora_B["default"].weight * 0.5)  # alpha / r


def test_export_without_lora_raises(folder: str) -> None:
    bb = load_backbone(ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16,
                                   patch=16))
    with pytest.raises(ValueError, match="attach LoRA"):
        diffusers_lora_state_dict(bb.trainable())


def test_export_run_converts_the_trainers_lora_file_without_a_model(folder: str, tmp_path) -> None:
    bb = _trained_backbone(folder, rank=4, alpha=8.0)
    save_lora(tmp_path / "lora.safetensors", bb.lora_state_dict(), metadata={"rank": "4", "alpha": "8.0"})
    path = export_run(tmp_path)
    assert path == tmp_path / WEIGHT_NAME
    want = export_diffusers_lora(bb.trainable(), tmp_path / "direct")
    got, ref = load_file(path), load_file(want)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    (tmp_path / "bare").mkdir()
    save_lora(tmp_path / "bare" / "lora.safetensors", bb.lora_state_dict())
    with pytest.raises(ValueError, match="no rank/alpha metadata"):
        export_run(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="lora.safetensors"):
        export_run(tmp_path / "direct")


def test_scaled_state_dict_rejects_what_is_not_lora_pairs() -> None:
    a, b = torch.ones(2, 3), torch.ones(3, 2)
    out = scaled_lora_state_dict({"x.lora_A.weight": a, "x.lora_B.weight": b}, 0.5)
    assert torch.equal(out["x.lora_B.weight"], b * 0.5) and torch.equal(out["x.lora_A.weight"], a)
    with pytest.raises(ValueError, match="unpaired"):
        scaled_lora_state_dict({"x.lora_A.weight": a}, 1.0)
    with pytest.raises(ValueError, match="unexpected keys"):
        scaled_lora_state_dict({"x.lora_A.weight": a, "x.lora_B.weight": b, "x.alpha": torch.ones(())}, 1.0)


# --- a run on UNO (model.lora_import): UNO's LoRA and ours as one file ---------------------------------------


def _uno_run(folder: str, tmp_path, targets: list[str], uno_rank: int = 4):
    """A 'finished run' on UNO: the base with a synthetic UNO LoRA merged (model.lora_import), our LoRA on top
    with random B (stand-in for training), its lora.safetensors and config.yaml. Returns (backbone, run dir)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from flux_tiny import synthetic_uno_state_dict
    from focusdpo.config import Config

    base = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    save_file(synthetic_uno_state_dict(base, rank=uno_rank, seed=5), tmp_path / "dit_lora.safetensors")
    cfg = Config(model=ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16, patch=16,
                                   lora_import=str(tmp_path / "dit_lora.safetensors")),
                 lora=LoraConfig(rank=4, alpha=8.0, targets=targets))
    bb = load_backbone(cfg.model)
    bb.add_lora(cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    run = tmp_path / "run"
    run.mkdir()
    save_lora(run / "lora.safetensors", bb.lora_state_dict(), metadata={"rank": "4", "alpha": "8.0"})
    cfg.save(run / "config.yaml")
    return bb, run


DEFAULT_TARGETS = LoraConfig().targets  # double-block attention; in single blocks they match to_q/to_k/to_v


def test_export_of_a_uno_run_reproduces_the_trained_model_in_flux_pipeline(folder: str, tmp_path) -> None:
    """Modules both adapters touch (attention q/k/v/out), UNO's alone (single blocks' proj_out) and ours alone
    (proj_mlp, which UNO's processors do not reach) all come out right from one file."""
    bb, run = _uno_run(folder, tmp_path, DEFAULT_TARGETS + ["proj_mlp"])
    x_t, t, text, refs, grid = _inputs(bb)
    with torch.no_grad():
        ours, _ = bb.predict(x_t, t, text, refs, grid)
    before = export_diffusers_lora(bb.trainable(), tmp_path / "ours-only")  # what export wrote before issue 18
    path = export_run(run)
    assert path == run / WEIGHT_NAME
    sd = load_file(path)
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")}
    assert ranks == {4 + 4}  # UNO's 4 + ours 4, every module padded to the one rank
    assert "transformer.single_transformer_blocks.0.proj_out.lora_A.weight" in sd  # UNO alone
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in sd  # ours alone
    diffs = {}
    for name, lora_dir in (("before", before.parent), ("after", run)):
        pipe = FluxPipeline.from_pretrained(folder)
        pipe.load_lora_weights(str(lora_dir))
        diffs[name] = (_pipeline_predict(pipe, x_t, t, text, refs, grid) - ours).abs().max().item()
        if name == "after":
            torch.testing.assert_close(_pipeline_predict(pipe, x_t, t, text, refs, grid), ours, rtol=1e-4, atol=1e-5)
    assert diffs["before"] > 1e-2  # our adapter alone misses UNO's update: the bug of issue 18
    print(f"max abs difference to the trained model: ours only {diffs['before']:.3g}, combined {diffs['after']:.3g}")


def test_uno_format_round_trips_through_the_uno_importer(folder: str, tmp_path) -> None:
    from focusdpo.backbones.lora_export import UNO_WEIGHT_NAME
    from focusdpo.backbones.uno import load_uno_lora_file, merge_uno_lora, uno_to_diffusers_pairs

    bb, run = _uno_run(folder, tmp_path, DEFAULT_TARGETS, uno_rank=3)
    path = export_run(run, tmp_path / "uno", fmt="uno")
    assert path == tmp_path / "uno" / UNO_WEIGHT_NAME
    written = load_uno_lora_file(path)
    cfg = bb.transformer.config
    assert {v.shape[0] for k, v in written.items() if k.endswith("down.weight")} == {3 + 3 * 4}  # UNO + q, k, v
    # the importer reads every module's update as exactly UNO's plus ours (the diffusers export's B' @ A')
    pairs = uno_to_diffusers_pairs(written, cfg.num_layers, cfg.num_single_layers)  # every block present
    combined = load_file(export_run(run, tmp_path / "diffusers"))
    assert {f"transformer.{p}.lora_A.weight" for p in pairs} == {k for k in combined if k.endswith("lora_A.weight")}
    for p, pair in pairs.items():
        want = combined[f"transformer.{p}.lora_B.weight"] @ combined[f"transformer.{p}.lora_A.weight"]
        torch.testing.assert_close(pair.up @ pair.down, want, rtol=1e-5, atol=1e-6)
    # and merging it into the plain base reproduces the trained model
    x_t, t, text, refs, grid = _inputs(bb)
    with torch.no_grad():
        ours, _ = bb.predict(x_t, t, text, refs, grid)
    pipe = FluxPipeline.from_pretrained(folder)  # the plain base: UNO's LoRA comes from the written file
    merge_uno_lora(pipe.transformer, written)
    torch.testing.assert_close(_pipeline_predict(pipe, x_t, t, text, refs, grid), ours, rtol=1e-4, atol=1e-5)


def test_uno_format_refuses_modules_unos_processors_cannot_hold(folder: str, tmp_path) -> None:
    from focusdpo.backbones.uno import UnoLoraError

    _, run = _uno_run(folder, tmp_path, DEFAULT_TARGETS + ["proj_mlp"])
    with pytest.raises(UnoLoraError, match=r"have no place in UNO's processors.*single_transformer_blocks.0.proj_mlp"):
        export_run(run, tmp_path / "uno", fmt="uno")
    with pytest.raises(ValueError, match="format='peft' is invalid: allowed diffusers, uno"):
        export_run(run, fmt="peft")
    with pytest.raises(UnoLoraError, match="does not exist.*--uno-lora"):
        export_run(run, uno_lora=tmp_path / "elsewhere" / "dit_lora.safetensors")


def test_export_lora_command_writes_unos_format_and_says_the_rank(folder: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from focusdpo.cli import app

    _, run = _uno_run(folder, tmp_path, DEFAULT_TARGETS, uno_rank=2)
    result = CliRunner().invoke(app, ["export-lora", str(run), "--format", "uno", "--out", str(tmp_path / "u")])
    assert result.exit_code == 0, result.output
    assert "UNO rank 14: pass --lora_rank 14" in result.output  # 2 + 3 x 4
    bad = CliRunner().invoke(app, ["export-lora", str(run), "--format", "kohya"])
    assert bad.exit_code == 2 and "allowed diffusers, uno" in bad.output


def test_combine_lora_state_dicts_sums_updates_at_one_rank() -> None:
    from focusdpo.backbones.lora_export import combine_lora_state_dicts

    g = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in ((2, 5), (3, 2), (4, 5), (3, 4)))
    only = torch.randn(1, 6, generator=g), torch.randn(7, 1, generator=g)
    out = combine_lora_state_dicts({"m.lora_A.weight": a1, "m.lora_B.weight": b1},
                                   {"m.lora_A.weight": a2, "m.lora_B.weight": b2,
                                    "n.lora_A.weight": only[0], "n.lora_B.weight": only[1]})
    torch.testing.assert_close(out["m.lora_B.weight"] @ out["m.lora_A.weight"], b1 @ a1 + b2 @ a2)
    torch.testing.assert_close(out["n.lora_B.weight"] @ out["n.lora_A.weight"], only[1] @ only[0])
    assert out["m.lora_A.weight"].shape == (6, 5) and out["n.lora_A.weight"].shape == (6, 6)  # padded to rank 6
    with pytest.raises(ValueError, match="disagree on 'm'"):
        combine_lora_state_dicts({"m.lora_A.weight": a1, "m.lora_B.weight": b1},
                                 {"m.lora_A.weight": torch.ones(1, 4), "m.lora_B.weight": torch.ones(3, 1)})


def test_uno_format_of_a_run_without_uno_holds_our_update_alone(folder: str, tmp_path) -> None:
    from focusdpo.backbones.uno import UnoLoraError, load_uno_lora_file, merge_uno_lora, uno_to_diffusers_pairs

    bb = _trained_backbone(folder, rank=4, alpha=8.0)  # default-like targets + proj_out, no UNO
    save_lora(tmp_path / "lora.safetensors", bb.lora_state_dict(), metadata={"rank": "4", "alpha": "8.0"})
    with pytest.raises(UnoLoraError, match=r"\['proj_out'\]"):  # the final layer: no UNO processor holds it
        export_run(tmp_path, fmt="uno")
    bb = load_backbone(ModelConfig.of(backbone="flux", checkpoint=folder, guidance=4.0, max_text_tokens=16, patch=16))
    bb.add_lora(LoraConfig(rank=4, alpha=8.0))  # attention only: single blocks' proj_lora has no source
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    save_lora(tmp_path / "lora.safetensors", bb.lora_state_dict(), metadata={"rank": "4", "alpha": "8.0"})
    written = load_uno_lora_file(export_run(tmp_path, fmt="uno"))
    cfg = bb.transformer.config
    pairs = uno_to_diffusers_pairs(written, cfg.num_layers, cfg.num_single_layers)  # complete, as UNO saves it
    want = load_file(export_diffusers_lora(bb.trainable(), tmp_path / "d"))
    for p, pair in pairs.items():
        delta = pair.up @ pair.down
        if p.endswith("proj_out"):  # the single blocks' proj_lora: nothing adds to it, zeros of the right shape
            assert not delta.any() and delta.shape == bb.transformer.get_submodule(p).weight.shape
        else:
            torch.testing.assert_close(delta, want[f"transformer.{p}.lora_B.weight"]
                                       @ want[f"transformer.{p}.lora_A.weight"], rtol=1e-5, atol=1e-6)
    x_t, t, text, refs, grid = _inputs(bb)
    with torch.no_grad():
        ours, _ = bb.predict(x_t, t, text, refs, grid)
    pipe = FluxPipeline.from_pretrained(folder)
    merge_uno_lora(pipe.transformer, written)  # the same importer as model.lora_import (all blocks required)
    torch.testing.assert_close(_pipeline_predict(pipe, x_t, t, text, refs, grid), ours, rtol=1e-4, atol=1e-5)


def test_run_uno_lora_reads_the_runs_config(tmp_path) -> None:
    from focusdpo.backbones.lora_export import run_uno_lora

    assert run_uno_lora(tmp_path) is None  # no config.yaml: nothing to combine
    (tmp_path / "config.yaml").write_text("model:\n  backbone: flux\n  flux:\n    lora_import: models/d.safetensors\n")
    assert run_uno_lora(tmp_path) == "models/d.safetensors"
    # a run folder written before the per-backbone sections (flat model.lora_import)
    (tmp_path / "config.yaml").write_text("model:\n  backbone: flux\n  lora_import: models/UNO/dit_lora.safetensors\n")
    with pytest.warns(FutureWarning, match="read as model.flux.lora_import"):
        assert run_uno_lora(tmp_path) == "models/UNO/dit_lora.safetensors"
    # a run of a plugin objective this process has not registered still names its UNO LoRA
    (tmp_path / "config.yaml").write_text("model:\n  lora_import: u.safetensors\ntrain:\n  objective: my-plugin\n")
    assert run_uno_lora(tmp_path) == "u.safetensors"
