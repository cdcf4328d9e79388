"""Focus-map strips: the maps per timestep obey the focus invariants; the command loads a run and writes a PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_fixtures import tiny_config, tiny_overrides
from typer.testing import CliRunner

from focusdpo.backbones import load_backbone
from focusdpo.cli import app
from focusdpo.data import ensure_toy_dip
from focusdpo.data.dataset import DipDataset
from focusdpo.focus import pool_to_tokens
from focusdpo.train.focus_strip import focus_maps, focus_strip, load_run_backbone, record_batch
from focusdpo.train.trainer import train, validation_batch


@pytest.fixture(scope="module")
def run(tiny_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("strip") / "run"
    return train(tiny_config(*tiny_env, train__max_steps=2, train__output_dir=out))


def _batch(cfg):
    return validation_batch(DipDataset(ensure_toy_dip(cfg)), 2)


def test_maps_per_timestep_obey_the_focus_invariants(tiny_env) -> None:
    cfg = tiny_config(*tiny_env, focus__tau=0.5)
    backbone = load_backbone(cfg.model)
    batch = _batch(cfg)
    sigmas = (0.95, 0.5, 0.05)
    maps = focus_maps(backbone, batch, cfg, sigmas)
    h, w = backbone.token_grid(tuple(batch["positive"].shape[-2:]))
    member = pool_to_tokens(batch["regions"][0], backbone.patch) >= 0.5  # [K, h, w]
    union = member.any(0)
    assert [m["sigma"] for m in maps] == list(sigmas)
    for m in maps:
        assert m["W"].shape == (h, w) and float(m["W"].mean()) == pytest.approx(1.0, abs=1e-5)
        assert m["gate"] == float(m["a"] >= cfg.focus.tau)
        assert not (m["confused"] & m["aligned"]).any()
        assert torch.equal(m["confused"] | m["aligned"], union)  # M_s and A partition the subject tokens
        assert int(m["claimed"].max()) <= member.shape[0] and int(m["claimed"].min()) >= 0
        assert float(m["m_d"][~union].abs().max()) == 0.0  # M_d is kept inside the subject regions
        aligned_expected = torch.zeros_like(union)
        for k in range(member.shape[0]):
            aligned_expected |= (m["claimed"] == k + 1) & member[k]
        assert torch.equal(m["aligned"], aligned_expected)  # A = union_k (M'_k ∩ P_k)


def test_strip_image_has_a_column_per_timestep(tiny_env, tmp_path) -> None:
    cfg = tiny_config(*tiny_env)
    backbone = load_backbone(cfg.model)
    batch = _batch(cfg)
    two = focus_strip(backbone, batch, cfg, tmp_path / "two.png", sigmas=(0.8, 0.2))
    four = focus_strip(backbone, batch, cfg, sigmas=(0.8, 0.6, 0.4, 0.2))
    assert two.dtype == np.uint8 and two.ndim == 3 and two.shape[2] == 3
    assert four.shape[1] > two.shape[1] and four.shape[0] == two.shape[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two.png").convert("RGB")), two)
    assert two.std() > 0  # not a blank canvas


def test_run_backbone_carries_the_runs_lora(run, tiny_env) -> None:
    cfg = tiny_config(*tiny_env)
    backbone = load_run_backbone(cfg, run)
    saved = load_file(str(run / "lora.safetensors"))
    own = backbone.lora_state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)


def test_record_by_id_or_index(tiny_env) -> None:
    cfg = tiny_config(*tiny_env)
    ids = DipDataset(ensure_toy_dip(cfg)).ids
    assert record_batch(cfg, ids[3])["id"] == [ids[3]]
    assert record_batch(cfg, "5")["id"] == [ids[5]]
    with pytest.raises(ValueError, match="neither a record id nor an index"):
        record_batch(cfg, "no-such-record")


def test_focus_map_command_writes_a_png(run, tiny_env, tmp_path) -> None:
    out = tmp_path / "strip.png"
    result = CliRunner().invoke(app, ["focus-map", "--run", str(run), "--record", "1", "--out", str(out),
                                      "--sigmas", "0.9,0.5,0.1", *tiny_overrides(*tiny_env)[:10]])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 100
    bad = CliRunner().invoke(app, ["focus-map", "--run", str(run), "--sigmas", "0.5,1.5", "--out",
                                   str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "sigma=1.5 is invalid" in bad.output


def test_unfinished_run_gives_its_newest_checkpoint_lora(run, tiny_env, tmp_path) -> None:
    """Without lora.safetensors: the eval loader refuses the run, the focus-map loader takes the checkpoint's."""
    import shutil

    from focusdpo.runs import MethodError, load_method
    from focusdpo.train import checkpoint as ckpt

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "lora.safetensors").unlink()
    latest = ckpt.latest_checkpoint(unfinished)
    assert latest is not None
    cfg = tiny_config(*tiny_env)
    with pytest.raises(MethodError, match="no lora.safetensors"):
        load_method(cfg, unfinished, check_world=False)
    saved = load_file(str(latest / "lora.safetensors"))
    own = load_run_backbone(cfg, unfinished).lora_state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)
