"""A multi-subject record of the shared DreamBench photos built with ``dip build --auto-masks`` (issue 18 point 2):
no masks in the manifest, no mask models cached (the suite is offline), so the default ``data.mask_backend=auto``
falls back to GrabCut with the reason printed, masks the two subjects of a side-by-side composition and orders
them by colour; the record becomes ``attribute_swap`` / ``cross_paste`` pairs (a one-subject-only mask rejected
such a record before)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shared_data import DREAMBENCH, needs_dreambench

pytest.importorskip("cv2")

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "dreambench_multi_manifest.py"


def _write_manifest():
    spec = importlib.util.spec_from_file_location("dreambench_multi_manifest", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_manifest


@needs_dreambench
def test_dog_and_backpack_build_into_two_subject_pairs(tmp_path):
    from focusdpo.cli import app
    from focusdpo.data.dataset import DipDataset

    manifest = _write_manifest()(DREAMBENCH, tmp_path, pairs=[("dog", "backpack")], tile=256)
    line = json.loads(manifest.read_text())
    assert line["prompt"] == "a dog and a backpack" and "mask" not in line["references"][0]
    # the same photo with the references the other way round: the masks must follow the references
    swapped = {**line, "id": "backpack-first", "prompt": "a backpack and a dog",
               "references": line["references"][::-1]}
    manifest.write_text(json.dumps(line) + "\n" + json.dumps(swapped) + "\n")
    out = tmp_path / "dip"
    res = CliRunner().invoke(app, ["dip", "build", "--manifest", str(manifest), "--auto-masks", "--patch", "16",
                                   "--ref-size", "64", "--seed", "0", "--out", str(out),
                                   "data.disruptions={attribute_swap: 1, cross_paste: 1}"])
    assert res.exit_code == 0, res.output
    assert "auto masks: GrabCut (the detector/segmenter are unavailable" in res.output
    assert "Traceback" not in res.output and (out / "rejected.jsonl").read_text() == ""
    ds = DipDataset(out)
    assert len(ds) == 2
    drawn = set()
    for i, left in ((0, 0), (1, 1)):  # the subject shown on the left: dog (reference 0 of line 1, 1 of line 2)
        rec = ds.record(i)
        drawn.add(rec.disruption)
        assert rec.num_subjects == 2 and rec.positive.shape == (256, 512, 3)
        assert rec.source["mask_origin"]["target_masks"] == "grabcut-strips"
        areas = rec.regions.reshape(2, -1).mean(axis=1)
        assert ((areas > 0.05) & (areas < 0.45)).all(), areas  # each subject: a part of its half
        assert rec.regions[left][:, :256].mean() > 0.1 and not rec.regions[left][:, 256:].any()
        assert rec.regions[1 - left][:, 256:].mean() > 0.1 and not rec.regions[1 - left][:, :256].any()
        assert not (rec.m_prior & ~rec.regions.any(0)).any()
        assert np.array_equal(rec.negative[~rec.m_prior], rec.positive[~rec.m_prior])
        assert (rec.negative[rec.m_prior] != rec.positive[rec.m_prior]).any()
    assert drawn == {"attribute_swap", "cross_paste"}  # seed 0 draws one of each for lines 1 and 2
