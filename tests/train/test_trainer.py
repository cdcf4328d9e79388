"""The training loop in-process: run folder, exact resume, signals, non-finite stops, config errors."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny_config, tiny_overrides
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import Config, ConfigError
from focusdpo.train import checkpoint as ckpt
from focusdpo.train import trainer as trainer_mod
from focusdpo.train.run_folder import RunFolderError
from focusdpo.train.run_log import COLUMNS, read_metrics
from focusdpo.train.step import NonFiniteError
from focusdpo.train.trainer import TrainingError, TrainingInterrupted, train


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def straight(tiny_env, tmp_path_factory):
    """A 4-step focusdpo run without interruption, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("straight") / "run"
    cfg = tiny_config(*tiny_env, train__max_steps=4, train__checkpoint_every=2, train__output_dir=out)
    return cfg, train(cfg)


def test_run_folder_holds_config_metrics_events_checkpoints_and_lora(straight) -> None:
    cfg, run = straight
    assert Config.from_yaml((run / "config.yaml").read_text()) == cfg
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "loss"] and tuple(header) == COLUMNS
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at init: policy == reference
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "implicit_acc", "margin", "a", "gate", "grad_norm"))
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4]
    lora = load_file(str(run / "lora.safetensors"))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if ".lora_B." in k)  # trained away from 0
    final = ckpt.load_checkpoint(ckpt.step_dir(run, 4))["lora"]
    assert all(torch.equal(final[k], lora[k]) for k in lora)
    assert (run / "val" / "samples-step-00000004.png").is_file()
    assert (run / "val" / "focus-step-00000004.png").is_file()


def test_tensorboard_has_every_step_metric(straight) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = straight
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("loss", "implicit_acc", "margin", "err_w", "err_l", "ref_err_w", "ref_err_l", "w_in_prior",
                "w_out_prior", "a", "gate", "time_data", "time_forward", "time_backward"):
        assert f"train/{key}" in tags, key
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert {"val/samples", "val/focus"} <= set(acc.Tags()["images"])


def test_resume_continues_with_the_same_losses(straight, tiny_env, tmp_path) -> None:
    cfg, run = straight
    out = tmp_path / "run"
    first = tiny_config(*tiny_env, train__max_steps=2, train__checkpoint_every=2, train__output_dir=out)
    train(first)
    train(tiny_config(*tiny_env, train__max_steps=4, train__checkpoint_every=2, train__output_dir=out), resume=True)
    assert _losses(out) == _losses(run)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_sigterm_checkpoints_then_resume_matches(straight, tiny_env, tmp_path, monkeypatch) -> None:
    _, run = straight
    real = trainer_mod.pair_step

    def step_then_signal(policy, backbone, batch, noise, cfg):
        if noise.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step finishes first
        return real(policy, backbone, batch, noise, cfg)

    out = tmp_path / "run"
    cfg = tiny_config(*tiny_env, train__max_steps=4, train__checkpoint_every=0, train__output_dir=out)
    monkeypatch.setattr(trainer_mod, "pair_step", step_then_signal)
    with pytest.raises(TrainingInterrupted, match="after step 3"):
        train(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3]
    assert not (out / "lora.safetensors").exists()
    monkeypatch.setattr(trainer_mod, "pair_step", real)
    train(cfg, resume=True)
    assert _losses(out) == _losses(run)


def test_non_finite_prediction_stops_and_keeps_the_last_checkpoint(tiny_env, tmp_path, monkeypatch) -> None:
    real = trainer_mod.pair_step

    def poisoned(policy, backbone, batch, noise, cfg):
        if noise.step == 3:
            batch = {**batch, "positive": batch["positive"] * float("nan")}
        return real(policy, backbone, batch, noise, cfg)

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_mod, "pair_step", poisoned)
    with pytest.raises(TrainingError, match=r"step 3: non-finite reference prediction.*step-00000002 is intact"):
        train(tiny_config(*tiny_env, train__max_steps=4, train__checkpoint_every=2, train__output_dir=out))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    ckpt.load_checkpoint(ckpt.step_dir(out, 2))
    assert not (out / "lora.safetensors").exists()


def test_non_finite_gradient_stops_before_the_optimizer_moves(tiny_env, tmp_path, monkeypatch) -> None:
    real = trainer_mod.pair_step
    seen = {}

    def nan_grads(policy, backbone, batch, noise, cfg):
        out = real(policy, backbone, batch, noise, cfg)
        if noise.step == 2:
            seen["lora"] = {k: v.clone() for k, v in backbone.lora_state_dict().items()}
            seen["backbone"] = backbone
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "pair_step", nan_grads)
    with pytest.raises(TrainingError, match="step 2: non-finite gradient norm"):
        train(tiny_config(*tiny_env, train__max_steps=3, train__output_dir=tmp_path / "run"))
    after = seen["backbone"].lora_state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["lora"].items())


def test_gradient_accumulation_consumes_micro_batches(tiny_env, tmp_path) -> None:
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=2, train__grad_accum=2, train__output_dir=out))
    state = json.loads((ckpt.step_dir(out, 2) / "state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 4)  # 16 records / 2 = 8 batches per epoch
    assert len(read_metrics(out)) == 2


def test_logged_lr_follows_the_diffusers_schedule(tiny_env, tmp_path) -> None:
    """metrics.csv's lr column is diffusers' linear warm-up (i / 2, from 0) then cosine to 0 at step 4."""
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=4, train__warmup_steps=2, train__schedule="cosine",
                      train__output_dir=out))
    lrs = [row["lr"] for row in read_metrics(out)]
    assert lrs == pytest.approx([0.0, 0.0005, 0.001, 0.0005])  # train.lr = 0.001; cos(pi/2) at step 3


@pytest.mark.parametrize("override, message", [
    ("train.objective=focus", "train.objective='focus' is invalid"),
    ("loss.prediction=epsilon", "loss.prediction='epsilon' is invalid"),
    ("focus.tap_layer=7", "focus.tap_layer=7 is invalid"),
    ("train.grad_accum=0", "train.grad_accum=0 is invalid"),
    ("data.batch_size=64", "lower data.batch_size"),
])
def test_bad_config_fails_before_any_work(tiny_env, tmp_path, override, message) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *tiny_overrides(*tiny_env), f"train.output_dir={out}", override])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_resume_refuses_a_changed_config_and_fresh_runs_refuse_a_used_folder(straight, tiny_env) -> None:
    cfg, run = straight
    with pytest.raises(TrainingError, match="train.lr: 0.001 -> 0.002"):
        train(tiny_config(*tiny_env, train__max_steps=6, train__lr=0.002, train__output_dir=run), resume=True)
    with pytest.raises(RunFolderError, match="already holds checkpoints"):
        train(cfg)
    with pytest.raises(ConfigError, match="train.output_dir=None is invalid with --resume"):
        train(tiny_config(*tiny_env, train__output_dir="null"), resume=True)


def test_non_finite_error_names_the_metric() -> None:
    assert NonFiniteError("loss").metric == "loss"


def test_gradient_checkpointing_gives_the_same_steps(straight, tiny_env, tmp_path) -> None:
    _, run = straight
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=2, train__gradient_checkpointing="true", train__output_dir=out))
    assert _losses(out) == pytest.approx(_losses(run)[:2], rel=1e-6)


def test_regional_compile_gives_the_same_steps(straight, tiny_env, tmp_path) -> None:
    """train.compile traces every repeated block with dynamo (the eager backend: no code generation on CPU);
    the tap hook, the adapters and their switch-off for the reference must survive it unchanged."""
    import torch

    _, run = straight
    out = tmp_path / "run"
    torch._dynamo.reset()
    try:
        train(tiny_config(*tiny_env, train__max_steps=2, train__compile="true", train__compile_backend="eager",
                          train__output_dir=out))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks really were compiled
    finally:
        torch._dynamo.reset()
    assert _losses(out) == pytest.approx(_losses(run)[:2], rel=1e-5)


def test_bf16_autocast_after_an_fp32_run_in_the_same_process(straight, tiny_env, tmp_path) -> None:
    """accelerate keeps its state process-wide; a later train() may still switch to bf16 (the demo's pattern)."""
    _, run = straight
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=1, train__mixed_precision="bf16", train__output_dir=out))
    bf16, fp32 = read_metrics(out)[0], read_metrics(run)[0]
    assert bf16["err_w"] != fp32["err_w"]  # autocast really was on
    assert bf16["err_w"] == pytest.approx(fp32["err_w"], rel=0.02)


@pytest.mark.parametrize("objective", ["sft", "patchdpo"])
def test_objectives_without_reference_leave_dpo_columns_empty(tiny_env, tmp_path, objective) -> None:
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=1, train__objective=objective, train__output_dir=out))
    row = read_metrics(out)[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["err_w"])
    assert math.isnan(row["ref_err_w"]) and math.isnan(row["implicit_acc"])
    assert math.isnan(row["a"])  # the focus is computed only for the objective that uses it ...
    logged = tmp_path / "logged"  # ... or when asked
    train(tiny_config(*tiny_env, train__max_steps=1, train__objective=objective, train__output_dir=logged,
                      focus__log_alignment="true"))
    logged_row = read_metrics(logged)[0]
    assert math.isfinite(logged_row["a"]) and 0 <= logged_row["a"] <= 1
    if objective == "sft":  # unweighted regression: no weights of its own; the logged focus says W = 1
        assert math.isnan(row["w_in_prior"]) and logged_row["w_in_prior"] == logged_row["w_out_prior"] == 1.0
    else:  # PatchDPO's own patch weights (positives up-weighted inside M_prior), never overwritten by the focus's
        assert row["w_in_prior"] > 1.0 > row["w_out_prior"]
        assert (logged_row["w_in_prior"], logged_row["w_out_prior"]) == (row["w_in_prior"], row["w_out_prior"])
