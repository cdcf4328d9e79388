"""focus-probe on a DIP set (``--dip``): the positives and regions of the records, any backbone of the config."""

from __future__ import annotations

import json

from train_fixtures import tiny_config

from focusdpo.data import ensure_toy_dip
from focusdpo.eval.probe import focus_probe_command


def test_probe_of_a_dip_set_writes_every_readout_with_chance_and_ceiling(tiny_env, tmp_path) -> None:
    cfg = tiny_config(*tiny_env)
    dip = ensure_toy_dip(cfg)
    result = focus_probe_command(cfg, None, dip, tmp_path, n=6, draws=1, blocks=["all", "single:0"])
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["n_positives"] == 6
    assert set(saved["readouts"]) == {f"{r}@{b}" for r in ("attention", "cosine", "cosine_centered")
                                      for b in ("all", "single:0")}
    assert saved["default"] == "attention@all" and "DIP set" in saved["source"]
    assert saved["ceiling"]["a_train"] > saved["chance"]["a_train"]  # the truth beats random scores
    for entry in saved["readouts"].values():
        assert all(0.0 <= v <= 1.0 for v in entry["a"].values()) and 0.0 <= entry["a_train"] <= 1.0
