"""`focusdpo dip build|show` end to end on a tiny toy set."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from focusdpo.cli import app


def test_dip_build_and_show(tmp_path):
    runner = CliRunner()
    out = tmp_path / "dip"
    res = runner.invoke(app, ["dip", "build", "--world", "toy", "--n", "12", "--seed", "2", "--out", str(out),
                              "--patch", "8", "data.shard_records=5"])
    assert res.exit_code == 0, res.output
    assert "wrote 12 records" in res.output and "rejected 0" in res.output and "records/s" in res.output
    card = json.loads((out / "card.json").read_text())
    assert card["records"] == 12 and card["m_d_patch"] == 8 and len(card["shards"]) == 3
    assert card["command"].startswith("focusdpo ")
    res = runner.invoke(app, ["dip", "show", str(out), "--out", str(tmp_path / "s.png"), "--n", "3"])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "s.png") as im:
        assert im.width > 5 * 96 and im.height > 3 * 96
    res = runner.invoke(app, ["dip", "build", "--world", "toy", "--n", "2", "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output


def test_dip_build_needs_one_source(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["dip", "build", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = runner.invoke(app, ["dip", "build", "--world", "mars", "--out", str(tmp_path)])
    assert res.exit_code == 2
