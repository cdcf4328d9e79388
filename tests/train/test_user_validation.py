"""train.validation: the user's prompts and reference files, checked before training, sampled at
checkpoint_every and at the end into validation/step-N.png and the tracker."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
from PIL import Image
from train_fixtures import tiny_config
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import ConfigError
from focusdpo.train.trainer import train


def _refs(tmp_path, n: int = 2) -> list[str]:
    paths = []
    for k in range(n):
        p = tmp_path / f"ref{k}.png"
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)).save(p)  # any size: resized
        paths.append(str(p))
    return paths


def _validation(prompts_refs_seeds) -> str:
    """The override value (JSON is YAML) of ``train.validation``."""
    return json.dumps([{"prompt": p, "references": r, "seed": s} for p, r, s in prompts_refs_seeds])


def test_user_prompts_are_sampled_at_checkpoints_and_the_end(tiny_env, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    refs = _refs(tmp_path)
    run = tmp_path / "run"
    value = _validation([("a ball and a box", refs, None), ("a ball", refs[:1], 7)])
    cfg = tiny_config(*tiny_env, train__max_steps=4, train__checkpoint_every=2, train__output_dir=run,
                      train__validation=value)
    assert [v.seed for v in cfg.train.validation] == [None, 7]
    train(cfg)
    files = sorted(p.name for p in (run / "validation").iterdir())
    assert files == ["step-00000002.png", "step-00000004.png"]
    grid = np.asarray(Image.open(run / "validation/step-00000004.png"))
    # two rows (refs | sample) of 16 + 2 * 2 px, 2 px apart; the references resized to the records' 8 px, the
    # samples at the records' 16 px: the widest row is 8 + 8 + 16 px + 4 pads
    assert grid.shape == (20 + 2 + 20, 8 + 8 + 16 + 4 * 2, 3)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Images("validation/samples")] == [2, 4]
    first = np.asarray(Image.open(run / "validation/step-00000002.png"))
    assert first.shape == grid.shape and not np.array_equal(first, grid)  # the LoRA moved between them
    card = (run / "README.md").read_text()  # the model card shows the newest grid with the prompts
    assert "1. a ball and a box\n2. a ball\n\n![validation](validation/step-00000004.png)" in card
    export = tmp_path / "export"
    assert CliRunner().invoke(app, ["export-lora", str(run), "--out", str(export)]).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(export / "validation.png")), grid)
    assert "![validation](validation.png)" in (export / "README.md").read_text()


def test_the_sample_is_generate_with_the_entry_seed(tiny_env, tmp_path) -> None:
    """The row's sample equals focusdpo.sampling.generate on the resized references with the entry's seed."""
    from focusdpo.backbones import load_backbone
    from focusdpo.sampling import generate
    from focusdpo.train.user_validation import load_references, write_validation

    refs = _refs(tmp_path, 1)
    cfg = tiny_config(*tiny_env, train__validation=_validation([("a ball", refs, 5)]))
    backbone = load_backbone(cfg.model)
    (loaded,) = load_references(cfg, (8, 8))
    assert loaded[0].shape == (1, 3, 8, 8) and 0 <= float(loaded[0].min()) and float(loaded[0].max()) <= 1
    grid = write_validation(backbone, cfg, [loaded], (16, 16), tmp_path / "v.png", nullcontext)
    expected = generate(backbone, ["a ball"], loaded, (16, 16), cfg.sample, seed=5)
    sample = grid[2:18, 2 + 8 + 2:2 + 8 + 2 + 16].astype(np.float32) / 255
    want = expected[0].permute(1, 2, 0).numpy()
    assert np.abs(sample - want).max() <= 1 / 255 + 1e-6
    assert np.array_equal(np.asarray(Image.open(tmp_path / "v.png")), grid)


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.png"), r"train.validation\[0\].references\[1\]='.*missing.png' is invalid: no such "
                                       r"file"),
    (lambda d: (d / "bad.png").write_bytes(b"not an image") and str(d / "bad.png"),
     r"train.validation\[0\].references\[1\]='.*bad.png' is invalid: reference image .* cannot be read"),
])
def test_bad_reference_files_fail_before_any_work(tiny_env, tmp_path, make, message) -> None:
    good = _refs(tmp_path, 1)
    out = tmp_path / "run"
    cfg = tiny_config(*tiny_env, train__output_dir=out,
                      train__validation=_validation([("a ball and a box", [good[0], make(tmp_path)], None)]))
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not out.exists()


def test_a_prompt_the_backbone_cannot_encode_fails_before_training(tiny_env, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(*tiny_env, train__output_dir=out, train__validation=_validation([("a cube", _refs(tmp_path, 1),
                                                                                       None)]))
    with pytest.raises(ConfigError, match=r"train.validation\[0\].prompt='a cube' is invalid: .*\['cube'\]"):
        train(cfg)
    assert not (out / "metrics.csv").exists()


def test_entry_shape_errors_name_the_index(tiny_env) -> None:
    with pytest.raises(ConfigError, match=r"train.validation\[1\].references=\[\] is invalid: allowed a non-empty"):
        tiny_config(*tiny_env, train__validation="[{prompt: a, references: [x.png]}, {prompt: b, references: []}]")
    with pytest.raises(ConfigError, match=r"train.validation\[0\].prompt='' is invalid"):
        tiny_config(*tiny_env, train__validation="[{prompt: '', references: [x.png]}]")
