"""Method comparison: variant resolution and the statistics over training seeds (hand-computed)."""

import pytest

from focusdpo.compare import VARIANTS, resolve_variants, results_markdown, summarise
from focusdpo.config import load_config


def _m(fid, leak, prompt, per_seed=None):
    def block(v):
        return {"mean": v, "std": 0.0, "per_seed": per_seed or [v]}
    return {"fidelity": block(fid), "leakage": block(leak), "prompt": block(prompt)}


def test_resolve_variants_rejects_unknown_names():
    assert resolve_variants(["dpo", "focusdpo-no-gate"])["focusdpo-no-gate"] == VARIANTS["focusdpo-no-gate"]
    with pytest.raises(ValueError, match="focusdpo-no-magic"):
        resolve_variants(["focusdpo-no-magic"])


def test_ablations_differ_from_focusdpo_in_one_switch():
    cfg = load_config()
    full = cfg.with_overrides(VARIANTS["focusdpo"])
    for name, field in (("focusdpo-no-spaf", "spaf"), ("focusdpo-no-dpce", "dpce"), ("focusdpo-no-gate", "dynamic")):
        ablated = cfg.with_overrides(VARIANTS[name])
        assert getattr(ablated.focus, field) is False and getattr(full.focus, field) is True
        assert ablated.train == full.train


def test_summarise_over_training_seeds_with_paired_differences():
    """focusdpo leakage over seeds 0,1 = 0.2, 0.4 -> mean 0.3, std sqrt(0.02) = 0.1414;
    vs dpo (0.5, 0.5): diffs -0.3, -0.1 -> mean -0.2, std 0.1414; vs base 0.6: -0.4, -0.2 -> -0.3."""
    metrics = {
        "base": _m(0.5, 0.6, 0.9, per_seed=[0.4, 0.6]),
        "dpo@s0": _m(0.6, 0.5, 0.9), "dpo@s1": _m(0.6, 0.5, 0.9),
        "focusdpo@s0": _m(0.7, 0.2, 0.9), "focusdpo@s1": _m(0.8, 0.4, 0.9),
    }
    out = summarise(metrics, ["dpo", "focusdpo"], [0, 1])
    assert out["base"]["fidelity"]["mean"] == pytest.approx(0.5)
    assert out["base"]["fidelity"]["std"] == pytest.approx(0.1414, abs=1e-4)
    f = out["focusdpo"]
    assert f["leakage"]["mean"] == pytest.approx(0.3)
    assert f["leakage"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert f["vs_dpo"]["leakage"]["mean"] == pytest.approx(-0.2)
    assert f["vs_base"]["leakage"]["mean"] == pytest.approx(-0.3)
    assert "vs_dpo" not in out["dpo"]
    text = results_markdown(out, "focusdpo compare", [0, 1], load_config())
    assert "| focusdpo | 0.750 ± 0.071 | 0.300 ± 0.141 |" in text
    assert "| focusdpo | +0.150 ± 0.071 | -0.200 ± 0.141 |" in text


def test_compare_command_rejects_an_unknown_variant_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from focusdpo.cli import app

    result = CliRunner().invoke(app, ["compare", "--variants", "dpo,focusdpo-no-magic", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "focusdpo-no-magic" in result.output
    assert not (tmp_path / "c" / "runs").exists()
