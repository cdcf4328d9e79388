"""Mixed precision (issue 18 point 3): `no` from YAML and the command line, `auto` deferring to the launcher
(``ACCELERATE_MIXED_PRECISION``, what ``accelerate launch --mixed_precision`` sets), and the reason printed."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from focusdpo.config import Config, ConfigError, load_config
from focusdpo.train.precision import ENV, resolve_mixed_precision


@pytest.mark.parametrize("setting, launcher, cuda, bf16, want, why", [
    ("auto", None, False, False, "no", "no CUDA device"),
    ("auto", None, True, True, "bf16", "the GPU supports it"),
    ("auto", None, True, False, "no", "the GPU has no bf16"),
    ("auto", "fp16", True, False, "fp16", "follows the launcher: ACCELERATE_MIXED_PRECISION=fp16"),  # fp16 asked
    ("auto", "no", True, True, "no", "follows the launcher: ACCELERATE_MIXED_PRECISION=no"),
    ("auto", "BF16", False, False, "bf16", "follows the launcher"),  # accelerate's own CPU bf16 autocast
    ("bf16", "fp16", True, True, "bf16", "wins over the launcher's ACCELERATE_MIXED_PRECISION=fp16"),
    ("no", None, True, True, "no", "set in the config"),
    ("fp16", "fp16", True, False, "fp16", "set in the config"),
])
def test_which_setting_wins_and_why(setting, launcher, cuda, bf16, want, why) -> None:
    env = {} if launcher is None else {ENV: launcher}
    got = resolve_mixed_precision(setting, env, cuda=cuda, bf16=bf16)
    assert got.value == want and why in got.reason
    if setting != "auto" and launcher is not None and launcher.lower() == setting:
        assert "wins over" not in got.reason  # nothing to override


def test_refused_launcher_values_are_named() -> None:
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION='fp16' is invalid without a CUDA device"):
        resolve_mixed_precision("auto", {ENV: "fp16"}, cuda=False, bf16=False)
    with pytest.raises(ConfigError, match=r"ACCELERATE_MIXED_PRECISION='fp8' .* allowed no, bf16, fp16"):
        resolve_mixed_precision("auto", {ENV: "fp8"}, cuda=True, bf16=True)
    assert resolve_mixed_precision("no", {ENV: "fp8"}, cuda=True, bf16=True).value == "no"  # the config wins


def test_device_capabilities_come_from_torch_and_accelerate_use_cpu(monkeypatch) -> None:
    """A GPU without bf16 (e.g. a V100 or T4): auto is fp32, or fp16 when the launcher asks for it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", {}).value == "no"
    assert resolve_mixed_precision("auto", {ENV: "fp16"}).value == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", {}).value == "bf16"
    assert resolve_mixed_precision("auto", {"ACCELERATE_USE_CPU": "1"}).reason.endswith("no CUDA device")


def test_no_from_yaml_and_overrides_and_the_round_trip(tmp_path) -> None:
    """YAML 1.1 reads a bare `no` as False: the field takes False as "no"; the dump quotes it."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    cfg = load_config(None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    assert "mixed_precision: 'no'" in cfg.to_yaml()
    assert Config.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ConfigError, match="train.mixed_precision=True is invalid"):
        load_config(None, ["train.mixed_precision=yes"])  # True means nothing here
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):  # other fields keep their types
        load_config(None, ["train.gradient_checkpointing=auto"])


def test_config_command_accepts_no() -> None:
    from focusdpo.cli import app

    result = CliRunner().invoke(app, ["config", "train.mixed_precision=no"])
    assert result.exit_code == 0, result.output
    assert "mixed_precision: 'no'" in result.output


def test_make_accelerator_follows_the_launcher_under_auto_and_says_so(monkeypatch, capsys) -> None:
    from focusdpo.train.trainer import make_accelerator

    monkeypatch.setenv(ENV, "bf16")
    acc = make_accelerator(load_config(None, ["train.mixed_precision=auto"]))
    assert acc.mixed_precision == "bf16"
    assert "mixed precision bf16: train.mixed_precision=auto follows the launcher" in capsys.readouterr().out
    acc = make_accelerator(load_config(None, ["train.mixed_precision=no"]))
    assert acc.mixed_precision == "no"
    assert "wins over the launcher's ACCELERATE_MIXED_PRECISION=bf16" in capsys.readouterr().out
