"""World summary and preview sheet, and the ``focusdpo world`` command."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import WorldConfig
from focusdpo.world import World
from focusdpo.world.summary import describe, preview_sheet


def test_describe_counts_match_the_world():
    world = World(WorldConfig(n_identities=300, heldout_fraction=0.3))
    info = describe(world)
    assert info["identities"] == 300 and info["train"] + info["heldout"] == 300 and info["heldout"] == 90
    assert info["heldout_unseen_class_body_pattern"] + info["heldout_unseen_tuple_only"] == 90
    assert 0 < info["heldout_unseen_class_body_pattern"] <= 45
    assert info["combinations"] == (len(info["classes"]) * len(info["body_colours"]) * len(info["patterns"])
                                    * info["pattern_colours_per_body"] * len(info["details"]))
    json.dumps(info)


def test_preview_sheet_rows_hold_scene_and_references():
    world = World(WorldConfig())
    sheet, prompts = preview_sheet(world, np.random.default_rng(0), n_scenes=4, scale=2)
    assert len(prompts) == 4 and sheet.dtype == np.uint8
    assert sheet.shape == (4 * 34 * 2, (32 + 3 * 18 + 2) * 2, 3)
    again, _ = preview_sheet(world, np.random.default_rng(0), n_scenes=4, scale=2)
    assert np.array_equal(sheet, again)
    # the first scene sits at the top left, upscaled
    scene = world.sample_scene(np.random.default_rng(0), "train", 2)
    assert np.array_equal(sheet[2:66:2, 2:66:2], scene.image)


def test_world_command_prints_summary_and_writes_preview(tmp_path):
    out = tmp_path / "world.png"
    result = CliRunner().invoke(app, ["world", "--out", str(out), "--n", "3", "world.n_identities=100"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[:result.output.index("}") + 1])
    assert info["identities"] == 100
    assert Image.open(out).size[1] == 3 * 34 * 4
