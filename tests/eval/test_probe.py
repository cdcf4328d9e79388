"""focus-probe: SPAF's readouts scored against the true subject regions (planted answers), and the shipped base's
attention field finds the subjects where the hidden-state cosine does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from focusdpo.config import load_config
from focusdpo.eval.probe import _rule_stats, expected_under, focus_probe_command, toy_batches


def _two_subjects() -> torch.Tensor:
    regions = torch.zeros(1, 2, 16)
    regions[0, 0, :4], regions[0, 1, 8:12] = 1, 1
    return regions


def test_rule_stats_planted_answers() -> None:
    regions = _two_subjects()
    a, conf = _rule_stats(regions, regions, rho=1.0)  # scores = the truth: the ceiling
    assert a.tolist() == [1.0] and conf.tolist() == [0.0]
    a, conf = _rule_stats(regions.flip(1), regions, rho=1.0)  # each subject claims the other's region
    assert a.tolist() == [0.0] and conf.tolist() == [1.0]
    half = regions.clone()
    half[0, 0, 2:4], half[0, 0, 12:14] = 0, 2  # subject 0 puts half of its claim outside every region
    a, conf = _rule_stats(half, regions, rho=1.0)
    assert a.tolist() == [0.75] and conf.tolist() == [0.0]


def test_expected_under_interpolates_between_probed_timesteps() -> None:
    values = {0.1: 1.0, 0.5: 0.5, 0.9: 0.0}
    assert expected_under(values, np.array([0.3])) == pytest.approx(0.75)
    assert expected_under(values, np.array([0.0, 1.0])) == pytest.approx(0.5)  # held constant beyond the ends


def test_toy_batches_split_train_and_heldout_use_disjoint_identities() -> None:
    cfg = load_config(None, [])
    held = next(toy_batches(cfg, 4, counts=(2,)))
    train = next(toy_batches(cfg, 4, counts=(2,), split="train"))
    assert held["positive"].shape == train["positive"].shape == (4, 3, 32, 32)
    assert held["regions"].shape == (4, 2, 32, 32) and len(held["references"]) == 2
    assert not torch.equal(held["positive"], train["positive"])
    with pytest.raises(ValueError, match="split='test' is invalid"):
        next(toy_batches(cfg, 4, split="test"))


def test_probe_of_the_shipped_base_attention_beats_cosine_and_chance(tmp_path) -> None:
    """On held-out scenes the default readout (attention over all blocks) aligns far above chance; the first
    implementation's cosine of the middle double block does not (issue 13: 0.85 vs 0.29 vs 0.1)."""
    cfg = load_config(None, [])
    result = focus_probe_command(cfg, None, None, tmp_path, n=6, draws=1, blocks=["all", "double:1"])
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["default"] == "attention@all" == result["default"]
    entry = saved["readouts"]["attention@all"]
    assert set(entry["a"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"} and set(entry["confusion"]) == set(entry["a"])
    assert entry["a_train"] >= 0.6 and saved["chance"]["a_train"] <= 0.15
    assert saved["ceiling"]["a_train"] >= 0.9
    assert entry["a_train"] > saved["readouts"]["cosine@double:1"]["a_train"] + 0.2
    assert entry["confusion"]["0.5"] < saved["chance"]["confusion"]["0.5"]
    assert (tmp_path / "probe.png").stat().st_size > 0
    assert "attention@all (default)" in (tmp_path / "probe.md").read_text()


def test_focus_probe_cli_rejects_run_and_base_together(tmp_path) -> None:
    from typer.testing import CliRunner

    from focusdpo.cli import app

    result = CliRunner().invoke(app, ["focus-probe", "--base", "--run", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "give --run DIR or --base, not both" in result.output
    result = CliRunner().invoke(app, ["focus-probe", "--base", "--n", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--n=0" in result.output
