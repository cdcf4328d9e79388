"""Packaged configs by name (issue 18 point 4): `--config flux-uno` is how a pip user reaches them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import ConfigError, default_config_text, load_config, packaged_config_names

PACKAGED = Path(__file__).resolve().parents[1] / "src" / "focusdpo" / "configs"


def test_names_are_the_yaml_files_of_the_package() -> None:
    names = packaged_config_names()
    assert names == sorted(p.stem for p in PACKAGED.glob("*.yaml"))
    assert {"toy", "flux-uno", "flux2-klein"} <= set(names)


@pytest.mark.parametrize("name", ["flux-uno", "flux2-klein", "toy", "flux-uno.yaml"])
def test_a_name_loads_the_packaged_file(name, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: only the package can answer
    stem = name.removesuffix(".yaml")
    assert load_config(name, ["train.max_steps=7"]) == load_config(PACKAGED / f"{stem}.yaml", ["train.max_steps=7"])


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").write_text("train:\n  max_steps: 3\n")
    assert load_config("toy").train.max_steps == 3
    assert load_config(None).train.max_steps == load_config(PACKAGED / "toy.yaml").train.max_steps != 3


def test_an_unknown_name_lists_the_packaged_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config flux-unoo cannot be read \(No such file or directory\): give an "
                                          r"existing YAML file to --config, or the name of a packaged config: "
                                          r"flux-uno, flux2-klein, toy \(`focusdpo config --list`\)"):
        load_config("flux-unoo")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config("sub/flux-uno")  # a path with a folder is a path, never a name


def test_config_list_and_config_by_name_on_the_command_line(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    listed = CliRunner().invoke(app, ["config", "--list"])
    assert listed.exit_code == 0, listed.output
    rows = dict(line.split(None, 1) for line in listed.output.strip().splitlines())
    assert list(rows) == packaged_config_names()
    assert "UNO" in rows["flux-uno"] and "CPU" in rows["toy"]  # each header's first line
    shown = CliRunner().invoke(app, ["config", "--config", "flux-uno"])
    assert shown.exit_code == 0, shown.output
    assert "lora_import: models/UNO/dit_lora.safetensors" in shown.output
    bad = CliRunner().invoke(app, ["config", "--config", "nope"])
    assert bad.exit_code == 2 and "packaged config: flux-uno, flux2-klein, toy" in bad.output


@pytest.mark.parametrize("name", ["flux-uno", "flux2-klein", "toy"])
def test_headers_name_the_current_hub_cli_and_the_name_form(name) -> None:
    """`huggingface-cli` is gone from current huggingface_hub (it ships `hf`); headers say `--config NAME`."""
    header = "\n".join(line for line in default_config_text(name).splitlines() if line.startswith("#"))
    assert "huggingface-cli" not in header
    assert not re.search(r"--config configs/", header)
    assert f"--config {name}" in header
    if name != "toy":
        assert "hf download " in header
