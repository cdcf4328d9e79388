"""Hostile configs on the command line (issue 15 point 5): each is refused at load with exit code 2 and one
message naming the file or field and the fix, without a traceback; `--debug` shows the traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import ConfigError, load_config


def _config(*args: str):
    result = CliRunner().invoke(app, ["config", *args])
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr=inf is invalid: allowed a finite number"),
    ("train.lr=.nan", "train.lr=nan is invalid: allowed a finite number"),
    ("loss.beta=.inf", "loss.beta=inf is invalid: allowed a finite number"),
    ("train.seed=-1", "train.seed=-1 is invalid: allowed integers in [0, 4294967295]"),
    ("train.seed=4294967296", "train.seed=4294967296 is invalid"),
    ("data.seed=-3", "data.seed=-3 is invalid"),
    ("eval.seeds=[0,-1]", "eval.seeds=[0, -1] is invalid"),
    ("data.disruptions={attribute_swap: .inf}", "data.disruptions.attribute_swap=inf is invalid"),
    ("train.lr=[1", "override 'train.lr=[1' is not valid YAML at line 1, column 3"),
    ("data.disruptions={detail_erase: 1, detail_erase: 2}", "duplicate key 'detail_erase'"),
])
def test_bad_values_are_refused_naming_the_field(override, message) -> None:
    result = _config(override)
    assert result.exit_code == 2 and message in result.output, result.output


def test_config_file_missing_folder_malformed_duplicate_or_not_utf8(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    result = _config("--config", str(missing))
    assert result.exit_code == 2 and f"config {missing} cannot be read (No such file or directory)" in result.output
    result = _config("--config", str(tmp_path))
    assert result.exit_code == 2 and f"config {tmp_path} is a folder: give an existing YAML file" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: 0.1\n  max_steps: [1, 2\n")
    result = _config("--config", str(broken))
    assert result.exit_code == 2 and f"config {broken} is not valid YAML at line" in result.output
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 0.1\n  max_steps: 5\n  lr: 0.2\n")
    result = _config("--config", str(dup))
    assert result.exit_code == 2 and f"config {dup}: duplicate key 'lr' at line 4 (first at line 2)" in result.output
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  objective: caf\u00e9\n".encode("latin-1"))
    result = _config("--config", str(latin))
    assert result.exit_code == 2 and f"config {latin} is not UTF-8 text (byte 0xe9" in result.output


def test_good_values_still_load() -> None:
    cfg = load_config(None, ["train.lr=5e-4", "train.seed=4294967295", "loss.beta=1e6"])
    assert cfg.train.seed == 2**32 - 1 and cfg.loss.beta == 1e6


def test_debug_shows_the_traceback(tmp_path) -> None:
    quiet = CliRunner().invoke(app, ["config", "--config", str(tmp_path / "nope.yaml")])
    assert quiet.exit_code == 2 and not isinstance(quiet.exception, ConfigError)
    loud = CliRunner().invoke(app, ["--debug", "config", "--config", str(tmp_path / "nope.yaml")])
    assert isinstance(loud.exception, ConfigError) and "nope.yaml" in str(loud.exception)


def test_patch_zero_is_an_error_not_the_default(tmp_path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["dip", "build", "--world", "toy", "--n", "2", "--patch", "0", "--out", str(out)])
    assert result.exit_code == 2 and "--patch 0 is invalid: allowed an integer >= 1" in result.output
    assert not out.exists()


def test_focus_map_on_a_missing_run_folder_names_it(tmp_path) -> None:
    run = tmp_path / "no-run"
    result = CliRunner().invoke(app, ["focus-map", "--run", str(run)])
    assert result.exit_code == 2 and f"config {run / 'config.yaml'} cannot be read" in result.output
    assert "Traceback" not in result.output


def test_a_text_file_as_model_checkpoint_is_one_message_and_debug_shows_the_traceback(tmp_path) -> None:
    """The issue's `model.checkpoint=/etc/passwd`: handled by the one error path of every command."""
    fake = tmp_path / "passwd"
    fake.write_text("root:x:0:0:root:/root:/bin/bash\n")
    args = ["sample", "--n", "1", "--out", str(tmp_path / "s.png"), f"model.checkpoint={fake}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "sample: SafetensorError" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.png").exists()
    loud = CliRunner().invoke(app, ["--debug", *args])
    assert loud.exit_code != 2 and type(loud.exception).__name__ == "SafetensorError"
