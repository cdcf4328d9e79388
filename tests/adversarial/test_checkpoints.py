"""Damaged checkpoints, changed data, garbage LoRAs and a full disk (issue 15 point 4): a corrupt newest
checkpoint is named and skipped for the newest intact one (and the resumed run still matches an uninterrupted
one step for step); a changed DIP set is refused on resume; NaN/inf LoRA weights are refused by every command."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_fixtures import tiny_config, tiny_overrides
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.data import ensure_toy_dip
from focusdpo.train import checkpoint as ckpt
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import TrainingError, train


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def runs(tiny_env, tmp_path_factory):
    """``(cfg of 3 steps, straight 3-step run, finished 2-step run)``, both on a private copy of the DIP set."""
    root = tmp_path_factory.mktemp("ckpt_runs")
    dip = root / "dip"
    shutil.copytree(ensure_toy_dip(tiny_config(*tiny_env)), dip)

    def cfg(steps: int, out):
        return tiny_config(*tiny_env, train__max_steps=steps, train__checkpoint_every=1, data__path=dip,
                           train__output_dir=out)

    return cfg, train(cfg(3, root / "straight")), train(cfg(2, root / "two"))


def _copy(runs, tmp_path):
    cfg, _, two = runs
    out = tmp_path / "run"
    shutil.copytree(two, out)
    return cfg(3, out), out


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "lora.safetensors": _flip_last_byte,  # still parses: only the checksum sees it (the loss-77 case)
    "optimizer.pt": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "rng.pt": lambda p: p.write_bytes(b""),
    "state.json": lambda p: p.write_text("{garbage"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_named_skipped_and_set_aside(runs, tmp_path, name) -> None:
    _, straight, _ = runs
    cfg, out = _copy(runs, tmp_path)
    bad = ckpt.step_dir(out, 2)
    CORRUPTIONS[name](bad / name)
    with pytest.warns(UserWarning, match=rf"checkpoint file {bad / name} does not match its checksum.*resuming "
                                         rf"from {ckpt.step_dir(out, 1)}"):
        train(cfg, resume=True)
    assert _losses(out) == _losses(straight)  # step 2 trained again, exactly
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2, 3]
    assert (out / "checkpoints" / ".corrupt-step-00000002" / name).is_file()  # kept for inspection
    final, ref = load_file(str(out / "lora.safetensors")), load_file(str(straight / "lora.safetensors"))
    assert all(torch.equal(final[k], ref[k]) for k in ref)


def test_checkpoint_without_checksums_still_names_a_corrupt_file(runs, tmp_path) -> None:
    """Checkpoints written before checksums existed: an empty rng.pt used to print only `Aborted.`."""
    _, straight, _ = runs
    cfg, out = _copy(runs, tmp_path)
    for _, path in ckpt.list_checkpoints(out):
        (path / ckpt.CHECKSUMS).unlink()
    (ckpt.step_dir(out, 2) / "rng.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match=rf"checkpoint file {ckpt.step_dir(out, 2) / 'rng.pt'} is corrupt "
                                         r"\(EOFError"):
        train(cfg, resume=True)
    assert _losses(out) == _losses(straight)


def test_no_intact_checkpoint_is_one_message_with_exit_2(runs, tiny_env, tmp_path) -> None:
    cfg, out = _copy(runs, tmp_path)
    for _, path in ckpt.list_checkpoints(out):
        (path / "scheduler.pt").write_bytes(b"\x00" * 7)
    result = CliRunner().invoke(app, ["train", "--resume", *tiny_overrides(*tiny_env), f"train.output_dir={out}",
                                      f"data.path={cfg.data.path}", "train.max_steps=3", "train.checkpoint_every=1"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "no checkpoint of" in text and "step-00000001/scheduler.pt" in text and "step-00000002/scheduler.pt" in text


def test_resume_refuses_a_dip_set_rebuilt_in_place(runs, tiny_env, tmp_path) -> None:
    dip = tmp_path / "dip"
    shutil.copytree(runs[0](3, tmp_path).data.path, dip)
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=1, data__path=dip, train__output_dir=out))
    card = json.loads((dip / "card.json").read_text())
    original = (dip / "card.json").read_text()
    (dip / "card.json").write_text(json.dumps({**card, "seed": card["seed"] + 1}))
    again = tiny_config(*tiny_env, train__max_steps=2, data__path=dip, train__output_dir=out)
    with pytest.raises(TrainingError, match=rf"the DIP set {dip} changed since the checkpoint was written "
                                            r"\(card.json differ"):
        train(again, resume=True)
    (dip / "card.json").write_text(original)
    train(again, resume=True)  # the same set resumes
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def _poison(run_dir) -> None:
    from safetensors import safe_open

    path = run_dir / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path), metadata=meta)


def test_nan_lora_is_refused_by_every_command(runs, tiny_env, tmp_path) -> None:
    _, out = _copy(runs, tmp_path)
    _poison(out)
    commands = {
        "export-lora": ["export-lora", str(out), "--out", str(tmp_path / "exp")],
        "sample": ["sample", "--run", str(out), "--n", "1", "--out", str(tmp_path / "s.png"),
                   *tiny_overrides(*tiny_env)],
        "eval": ["eval", "--run", str(out), "--out", str(tmp_path / "ev"), *tiny_overrides(*tiny_env)],
        "focus-map": ["focus-map", "--run", str(out), "--out", str(tmp_path / "f.png")],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(app, args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "Traceback" not in text, (name, result.output)
        assert f"LoRA weights {out / 'lora.safetensors'}" in text and "hold NaN or inf" in text, (name, text)
    assert not (tmp_path / "exp").exists() and not (tmp_path / "s.png").exists()


def test_truncated_final_lora_is_named(runs, tmp_path) -> None:
    _, out = _copy(runs, tmp_path)
    path = out / "lora.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    result = CliRunner().invoke(app, ["export-lora", str(out), "--out", str(tmp_path / "exp")])
    assert result.exit_code == 2 and f"LoRA weights {path} cannot be read" in " ".join(result.output.split())


def test_disk_full_while_checkpointing_is_named_and_the_last_checkpoint_kept(runs, tiny_env, tmp_path,
                                                                           monkeypatch) -> None:
    from focusdpo.train import trainer as trainer_mod

    cfg, out = _copy(runs, tmp_path)
    real = ckpt.save_checkpoint

    def full(run_dir, state, *args, **kwargs):
        if state.step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(ckpt.temp_dir(run_dir, 3) / "optimizer.pt"))
        return real(run_dir, state, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.ckpt, "save_checkpoint", full)
    result = CliRunner().invoke(app, ["train", "--resume", *tiny_overrides(*tiny_env), f"train.output_dir={out}",
                                      f"data.path={cfg.data.path}", "train.max_steps=3", "train.checkpoint_every=1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in text, result.output
    assert "train: No space left on device (" in text and ".tmp-step-00000003/optimizer.pt" in text
    assert "free space on that disk" in text
    ckpt.load_checkpoint(ckpt.step_dir(out, 2))  # the last good checkpoint is intact
