"""``train.optimizer`` and the ``train.memory`` preset (issue 17 point 2)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from train_fixtures import tiny_config
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import ConfigError, load_config
from focusdpo.train import trainer as trainer_mod
from focusdpo.train.optimizers import check_optimizer, make_optimizer
from focusdpo.train.presets import MEMORY_PRESETS, effective_config
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import train


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor"])
def test_each_optimizer_trains_and_resumes_exactly(tiny_env, tmp_path, optimizer) -> None:
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    # rank 128 on width 32: LoRA matrices of 4096 elements, so bitsandbytes really keeps 8-bit state
    kw = dict(train__optimizer=optimizer, train__checkpoint_every=2, train__val_records=1, lora__rank=128,
              lora__alpha=128.0)
    straight = train(tiny_config(*tiny_env, train__max_steps=4, train__output_dir=tmp_path / "a", **kw))
    out = tmp_path / "b"
    train(tiny_config(*tiny_env, train__max_steps=2, train__output_dir=out, **kw))
    train(tiny_config(*tiny_env, train__max_steps=4, train__output_dir=out, **kw), resume=True)
    assert _losses(out) == _losses(straight)
    parts = json.loads((straight / "memory.json").read_text())["weight_bytes"]
    assert parts["optimizer_state"] < 0.7 * parts["adapters"]  # AdamW keeps 2x the adapters (two float32 moments)
    adamw = train(tiny_config(*tiny_env, train__max_steps=4, train__output_dir=tmp_path / "adamw",
                              **{**kw, "train__optimizer": "adamw"}))
    assert _losses(straight)[0] == _losses(adamw)[0]  # the same first step (log 2: LoRA B = 0)
    assert _losses(straight)[1:] != _losses(adamw)[1:]  # then another optimizer's updates


def test_make_optimizer_kinds() -> None:
    p = [torch.nn.Parameter(torch.zeros(8, 8))]
    assert type(make_optimizer("adamw", p, 1e-3, 0.0)) is torch.optim.AdamW
    assert "Adafactor" in type(make_optimizer("adafactor", p, 1e-3, 0.0)).__name__
    with pytest.raises(ConfigError, match="train.optimizer='sgd' is invalid: allowed one of adamw, adamw8bit"):
        check_optimizer("sgd", "cpu")
    with pytest.raises(ConfigError, match="train.optimizer='lion' is invalid"):
        load_config(None, ["train.optimizer=lion"])


def test_adamw8bit_refused_with_the_reason_where_bitsandbytes_cannot_run(monkeypatch) -> None:
    from focusdpo.train import optimizers

    def broken(*_a, **_k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(optimizers, "_adamw8bit", broken)
    with pytest.raises(ConfigError, match=r"adamw8bit' cannot run on cpu with bitsandbytes \(RuntimeError: no kernel"):
        check_optimizer("adamw8bit", "cpu")


def test_presets_only_turn_savings_on(tmp_path) -> None:
    flux = ["model.backbone=flux", "model.checkpoint=x", f"data.path={tmp_path / 'dip'}"]
    fast = effective_config(load_config(None, flux))
    assert (fast.train.gradient_checkpointing, fast.model.options.offload_encoders,
            fast.model.options.latent_cache) == (False, False, None)
    low = effective_config(load_config(None, flux + ["train.memory=low"]))
    assert (low.train.gradient_checkpointing, low.model.options.offload_encoders,
            low.model.options.latent_cache) == (True, True, str(tmp_path / "dip" / "latents"))
    balanced = effective_config(load_config(None, flux + ["train.memory=balanced"]))
    assert (balanced.train.gradient_checkpointing, balanced.model.options.offload_encoders) == (True, False)
    assert balanced.model.options.latent_cache == str(tmp_path / "dip" / "latents")
    # explicit fields: true always holds, an explicit cache folder is the one used
    mine = effective_config(load_config(None, flux + ["train.memory=fast", "train.gradient_checkpointing=true",
                                                      "model.flux.offload_encoders=true",
                                                      "model.flux.latent_cache=/c"]))
    assert (mine.train.gradient_checkpointing, mine.model.options.offload_encoders,
            mine.model.options.latent_cache) == (True, True, "/c")
    explicit = effective_config(load_config(None, flux + ["train.memory=low", "model.flux.latent_cache=/c"]))
    assert explicit.model.options.latent_cache == "/c"
    tiny = effective_config(load_config(None, ["train.memory=low"]))  # no encoders: checkpointing only
    assert tiny.train.gradient_checkpointing and not hasattr(tiny.model.options, "offload_encoders")
    raw = load_config(None, flux + ["train.memory=low"])
    assert dataclasses.replace(effective_config(raw)) != raw and raw.train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="train.memory='tiny' is invalid: allowed one of fast, balanced, low"):
        load_config(None, ["train.memory=tiny"])


def test_config_command_prints_every_preset_and_stays_yaml() -> None:
    result = CliRunner().invoke(app, ["config", "train.memory=low"])
    assert result.exit_code == 0, result.output
    for name in MEMORY_PRESETS:
        assert f"#   {name}: gradient_checkpointing=" in result.output
    assert "# effective now (train.memory=low): gradient_checkpointing=True" in result.output
    assert yaml.safe_load(result.output)["train"]["memory"] == "low"


def test_the_trainer_applies_the_preset_and_saves_the_fields_as_given(tiny_env, tmp_path, monkeypatch) -> None:
    seen = []
    real = trainer_mod._enable_gradient_checkpointing
    monkeypatch.setattr(trainer_mod, "_enable_gradient_checkpointing", lambda net: (seen.append(True), real(net)))
    run = train(tiny_config(*tiny_env, train__memory="low", train__max_steps=1, train__val_records=1,
                            train__output_dir=tmp_path / "run"))
    assert seen == [True]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["memory"] == "low" and saved["train"]["gradient_checkpointing"] is False
