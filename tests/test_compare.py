"""Method comparison: variant resolution and the statistics over training seeds (hand-computed)."""

import numpy as np
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


def _with_units(rng, fid, leak, n_units=300):
    """A run's metrics.json entry with per-unit scores (fidelity and prompt constant, leakage as given)."""
    keys = [[2, 0, 0, i] for i in range(n_units)]
    leak = np.asarray(leak, dtype=float)
    entry = _m(fid, float(np.nanmean(leak)), 0.9)
    entry["units"] = {"keys": keys, "fidelity": [fid] * n_units, "prompt": [0.9] * n_units,
                      "leakage": [None if np.isnan(v) else float(v) for v in leak]}
    return entry


def test_summarise_adds_paired_bootstrap_intervals_and_says_what_the_sample_sees():
    """Planted: dpo lowers every unit's leakage by 0.1 (plus small noise); focusdpo equals dpo exactly."""
    rng = np.random.default_rng(0)
    base_leak = rng.random(300)
    base_leak[:5] = np.nan  # units without a leakage value are skipped, not counted as 0
    metrics = {"base": _with_units(rng, 0.5, base_leak)}
    for s in (0, 1):
        dpo = np.clip(base_leak - 0.1 + rng.normal(0, 0.02, 300), 0, 1)
        metrics[f"dpo@s{s}"] = _with_units(rng, 0.5, dpo)
        metrics[f"focusdpo@s{s}"] = _with_units(rng, 0.5, dpo)
    out = summarise(metrics, ["dpo", "focusdpo"], [0, 1])
    d = out["dpo"]["vs_base"]["leakage"]
    assert d["ci"][1] < 0 and d["excludes_zero"] and d["n_units"] == 295
    assert d["ci"][0] < d["mean"] < d["ci"][1] and 0 < d["mde"] < 0.01
    same = out["focusdpo"]["vs_dpo"]["leakage"]
    assert same["ci"] == [0.0, 0.0] and not same["excludes_zero"] and same["mean"] == 0.0
    assert out["base"]["leakage"]["ci"][0] < out["base"]["leakage"]["mean"] < out["base"]["leakage"]["ci"][1]
    assert out["dpo"]["fidelity"]["ci"] == [0.5, 0.5]  # constant per-unit scores: no spread
    text = results_markdown(out, "focusdpo compare", [0, 1], load_config())
    assert "| dpo | 0.500 ± 0.000 [0.500, 0.500] |" in text
    assert "- dpo vs base: lowers leakage by -0.09" in text and ": interval excludes 0 (better); no detectable " \
        "difference in fidelity +0.000 [0.000, 0.000], detectable effect 0.000; prompt +0.000" in text
    assert "- focusdpo vs dpo: no detectable difference in fidelity" in text
    assert "leakage +0.000 [0.000, 0.000], detectable effect 0.000" in text
    assert "warning" not in text  # mde < 0.01 for every metric


def test_summarise_warns_when_the_evaluation_cannot_detect_the_target_effect():
    rng = np.random.default_rng(1)
    metrics = {"base": _with_units(rng, 0.5, rng.random(40), n_units=40),
               "dpo@s0": _with_units(rng, 0.5, rng.random(40), n_units=40)}
    out = summarise(metrics, ["dpo"], [0])
    d = out["dpo"]["vs_base"]["leakage"]
    assert d["mde"] == pytest.approx(2.8016 * d["se_unit"], rel=1e-3) and d["mde"] > 0.1
    text = results_markdown(out, "focusdpo compare", [0], load_config())
    assert "warning: this evaluation cannot detect a leakage difference of 0.01" in text
    needed = int(text.split("about ")[1].split(" units")[0])
    assert needed == pytest.approx(40 * (d["mde"] / 0.01) ** 2, rel=0.01)


def test_compare_command_evaluates_with_the_sized_budget_unless_overridden(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import focusdpo.compare
    from focusdpo.cli import app
    from focusdpo.eval.stats import units_needed

    seen = []

    def fake_compare(cfg, variants, seeds, out_dir, **kw):
        seen.append(cfg)
        (out_dir / "results.md").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.md").write_text("ok")
        return {}

    monkeypatch.setattr(focusdpo.compare, "compare", fake_compare)
    for extra in ([], ["eval.n_scenes=64", "eval.workers=1"]):
        result = CliRunner().invoke(app, ["compare", "--variants", "dpo", "--out", str(tmp_path / "c"), *extra])
        assert result.exit_code == 0, result.output
    default, overridden = seen
    units = default.eval.n_scenes * len(default.eval.subject_counts) * len(default.eval.seeds)
    assert units >= units_needed(0.097, 0.01) and default.eval.workers == 2  # the measured per-unit SD (compare.py)
    assert overridden.eval.n_scenes == 64 and overridden.eval.seeds == [0, 1] and overridden.eval.workers == 1


def test_leakage_split_planted_transfer_and_chance():
    """Planted: dpo's transfer is the base's minus 0.05 on every unit, its chance leakage unchanged; focusdpo
    equals dpo. Runs scored before the split existed give None (and no section)."""
    from focusdpo.compare import leakage_split, leakage_split_markdown

    rng = np.random.default_rng(2)
    chance = rng.random(200) * 0.1
    transfer = rng.random(200) * 0.1

    def entry(t):
        e = _with_units(rng, 0.5, chance + t, n_units=200)
        e["units"]["leakage_chance"] = chance.tolist()
        e["units"]["transfer"] = list(t)
        return e

    metrics = {"base": entry(transfer)}
    for s in (0, 1):
        metrics[f"dpo@s{s}"] = entry(transfer - 0.05)
        metrics[f"focusdpo@s{s}"] = entry(transfer - 0.05)
    split = leakage_split(metrics, ["dpo", "focusdpo"], [0, 1], replicates=500)
    d = split["dpo"]["vs_base"]["transfer"]
    assert d["mean"] == pytest.approx(-0.05) and d["excludes_zero"] and d["ci"][1] < 0
    assert split["dpo"]["vs_base"]["leakage_chance"]["mean"] == pytest.approx(0.0)
    assert split["focusdpo"]["vs_dpo"]["transfer"]["ci"] == [0.0, 0.0]
    assert split["base"]["transfer"]["mean"] == pytest.approx(transfer.mean())
    text = leakage_split_markdown(split)
    assert "| dpo | " in text and "**-0.050** [-0.050, -0.050]" in text
    del metrics["base"]["units"]["transfer"]
    assert leakage_split(metrics, ["dpo", "focusdpo"], [0, 1]) is None and leakage_split_markdown(None) == ""
