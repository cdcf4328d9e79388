"""The main job end to end: ``focusdpo demo --quick`` writes a well-formed report and metrics.json."""

import json

import pytest
from typer.testing import CliRunner

from focusdpo.cli import app


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "focusdpo"}
    for method in metrics.values():
        for name in ("fidelity", "leakage", "prompt"):
            assert 0.0 <= method[name]["mean"] <= 1.0
            assert method[name]["std"] >= 0.0
    report = (out / "report.md").read_text()
    assert "| base" in report and "| focusdpo" in report
    # every image the report links exists
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line.split("(")[1].rstrip(")")).is_file(), line
    assert (out / "focus_0.png").is_file()
    assert (out / "run" / "lora.safetensors").is_file()
    assert str(out / "report.md") in result.output
    # the paired difference to the base with its interval, called only when the interval excludes 0
    diff = metrics["focusdpo"]["vs_base"]["leakage"]
    assert diff["ci"][0] <= diff["mean"] <= diff["ci"][1] and "focusdpo vs base: " in result.output
    assert ("lowers leakage" in result.output or "raises leakage" in result.output) == diff["excludes_zero"]
    assert "detectable paired difference" in result.output and "## What the sample can see" in report


def test_demo_config_budget_and_overrides():
    from focusdpo.config import load_config
    from focusdpo.demo import demo_config

    quick = demo_config(load_config(), quick=True, overrides=["train.max_steps=3"])
    assert quick.train.objective == "focusdpo"
    assert quick.train.max_steps == 3  # the user's override wins over the budget
    assert quick.eval.seeds == [0]
    full = demo_config(load_config(), quick=False)
    assert full.train.max_steps > quick.train.max_steps and len(full.eval.seeds) >= 3


def test_demo_on_policy_config():
    from focusdpo.config import load_config
    from focusdpo.demo import demo_config, method_name

    full = demo_config(load_config(), quick=False, on_policy=True)
    assert full.data.refresh_every == 25 and full.train.max_steps == 100 and method_name(full) == "focusdpo-onpolicy"
    assert demo_config(load_config(), quick=True, on_policy=True).data.refresh_every > 0
    assert method_name(demo_config(load_config(), quick=False)) == "focusdpo"
    off = demo_config(load_config(), quick=True, overrides=["data.refresh_every=0"], on_policy=True)
    assert off.data.refresh_every == 0  # the user's override wins


@pytest.mark.slow
def test_demo_quick_on_policy_end_to_end(tmp_path):
    from focusdpo.train.refresh import read_rounds

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--on-policy", "--out", str(out),
                                      f"data.cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "focusdpo-onpolicy"}
    rounds = read_rounds(out / "run")
    assert [r["step"] for r in rounds] == [0, 6] and all(r["candidates"] == 8 for r in rounds)
    report = (out / "report.md").read_text()
    assert "## On-policy rounds" in report and "| focusdpo-onpolicy" in report
    assert "on-policy rounds every 6 steps" in result.output
