"""Tiny-base pretraining: runs, writes a loadable base, resumes exactly, CLI entry."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from focusdpo.backbones import load_backbone
from focusdpo.cli import app
from focusdpo.config import load_config
from focusdpo.train.pretrain import PretrainOptions, lr_at, pretrain

SMALL = ["model.flux-tiny.num_layers=1", "model.flux-tiny.num_single_layers=1", "model.flux-tiny.num_heads=2", "model.flux-tiny.head_dim=16",
         "model.flux-tiny.text_dim=16", "data.batch_size=2", "world.n_identities=40", "train.log_every=1",
         "train.checkpoint_every=2", "train.seed=3"]


def _cfg(steps: int, extra: tuple[str, ...] = ()):
    return load_config(None, SMALL + [f"train.max_steps={steps}", *extra])


def test_pretrain_writes_a_base_that_load_backbone_reads(tmp_path):
    lines: list[str] = []
    path = pretrain(_cfg(2), tmp_path, log=lines.append)
    assert path == tmp_path / "model.safetensors" and (tmp_path / "config.yaml").is_file()
    assert any("step 2 loss" in line for line in lines)
    cfg = _cfg(2)
    cfg.model.checkpoint = str(tmp_path)
    bb = load_backbone(cfg.model)
    assert bb.transformer.config.num_layers == 1 and "ball" in bb.text_encoder.vocabulary


def test_resume_matches_an_uninterrupted_run(tmp_path):
    """Stopped at step 2 (the cosine schedule still sized for 4), then resumed: the same weights as 4 straight."""
    cosine = ("train.schedule=cosine", "train.warmup_steps=1")
    pretrain(_cfg(4, cosine), tmp_path / "a", log=lambda _: None)
    pretrain(_cfg(4, cosine), tmp_path / "b", PretrainOptions(stop_at=2), log=lambda _: None)
    assert (tmp_path / "b/state/step.json").read_text() == '{"step": 2}'
    pretrain(_cfg(4, cosine), tmp_path / "b", log=lambda _: None)
    for name in ("state/raw.safetensors", "state/ema.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    raw, ema = load_file(str(tmp_path / "a/state/raw.safetensors")), load_file(str(tmp_path / "a/model.safetensors"))
    key = "transformer.proj_out.weight"
    assert not torch.equal(raw[key], ema[key])  # the shipped file is the EMA, not the raw weights


def test_lr_schedule_warmup_then_cosine_floor():
    cfg = _cfg(110, ("train.lr=0.001", "train.warmup_steps=10", "train.schedule=cosine"))
    opts = PretrainOptions(min_lr_fraction=0.1)
    assert lr_at(0, cfg, opts) == pytest.approx(1e-4)
    assert lr_at(9, cfg, opts) == pytest.approx(1e-3)
    assert lr_at(60, cfg, opts) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, cfg, opts) == pytest.approx(1e-4)


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="subject_counts"):
        PretrainOptions(subject_counts=(4,))


def test_cli_pretrain_max_steps(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path), "--max-steps", "1", "--threads", "1",
                                      *SMALL])
    assert result.exit_code == 0, result.output
    assert "step 1 loss" in result.output and (tmp_path / "model.safetensors").is_file()


def test_init_warm_starts_from_a_checkpoint_and_resume_wins(tmp_path):
    """--init copies a checkpoint's weights into step 0 of a new run; an existing state/ is resumed instead."""
    first = pretrain(_cfg(2), tmp_path / "a", log=lambda _: None)
    lines: list[str] = []
    pretrain(_cfg(2, ("train.lr=1e-30",)), tmp_path / "b", PretrainOptions(init=str(tmp_path / "a")),
             log=lines.append)
    a, b = load_file(str(first)), load_file(str(tmp_path / "b/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)  # lr ~0: the init
    assert any("steps 0..2" in line for line in lines)
    fresh = load_file(str(pretrain(_cfg(2, ("train.lr=1e-30",)), tmp_path / "c", log=lambda _: None)))
    assert not all(torch.allclose(a[k], fresh[k], rtol=0, atol=1e-6) for k in a)  # no init: a random start
    pretrain(_cfg(3), tmp_path / "b", PretrainOptions(init=str(tmp_path / "c")), log=lines.append)
    assert any("steps 2..3" in line for line in lines)  # state/ present: resumed, init ignored


def test_init_rejects_a_missing_or_mismatched_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="init"):
        pretrain(_cfg(1), tmp_path / "x", PretrainOptions(init=str(tmp_path / "nothing")), log=lambda _: None)
    pretrain(_cfg(1), tmp_path / "a", log=lambda _: None)
    with pytest.raises(ValueError, match="architecture"):
        pretrain(_cfg(1, ("model.flux-tiny.num_layers=2",)), tmp_path / "y", PretrainOptions(init=str(tmp_path / "a")),
                 log=lambda _: None)


def test_cli_init_shipped_continues_the_packaged_base(tmp_path):
    from focusdpo.backbones import shipped_base_path

    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path), "--init", "shipped", "--max-steps", "1",
                                      "--threads", "1", "data.batch_size=1", "train.lr=1e-30", "train.log_every=1"])
    assert result.exit_code == 0, result.output
    a, b = load_file(str(shipped_base_path())), load_file(str(tmp_path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)
