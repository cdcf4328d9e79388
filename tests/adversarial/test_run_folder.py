"""Hostile and careless uses of a run folder (issue 15 points 2 and 3): two trainers at once, a new run into a
used folder, signals and kills at the last step. Each test checks the message names the folder (or the holder's
pid) and that the earlier run's files are untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_fixtures import tiny_config, tiny_overrides
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.train import checkpoint as ckpt
from focusdpo.train import trainer as trainer_mod
from focusdpo.train.run_folder import LOCK_NAME, RunFolderError, RunFolderLock
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import train


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def _snapshot(run_dir) -> dict[str, bytes]:
    """Every file of a run folder (relative path -> bytes), the lock file excepted."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture(scope="module")
def finished(tiny_env, tmp_path_factory):
    """A finished 2-step run (checkpoint every step), never modified by the tests."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = tiny_config(*tiny_env, train__max_steps=2, train__checkpoint_every=1, train__output_dir=out)
    return cfg, train(cfg)


def _hold_lock(run_dir) -> subprocess.Popen:
    """Another process that takes the run folder's lock and sleeps (as a running trainer does)."""
    code = ("import sys, time; from focusdpo.train.run_folder import RunFolderLock; "
            "RunFolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_trainer_fails_at_once_naming_the_holders_pid(tiny_env, tmp_path) -> None:
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        cfg = tiny_config(*tiny_env, train__max_steps=1, train__output_dir=out)
        t0 = time.perf_counter()
        with pytest.raises(RunFolderError, match=rf"{out} is in use by another trainer \(pid {holder.pid} on "):
            train(cfg)
        assert time.perf_counter() - t0 < 10  # no waiting for the holder
        result = CliRunner().invoke(app, ["train", *tiny_overrides(*tiny_env), f"train.output_dir={out}",
                                          "train.max_steps=1"])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.output, result.output
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # the refused trainers wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # kill -9 leaves no stale lock: the next trainer starts at once
    train(cfg)
    assert (out / "lora.safetensors").is_file()


def test_lock_is_exclusive_within_a_process_and_released(tmp_path) -> None:
    first = RunFolderLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on "):
        RunFolderLock(tmp_path / "run").acquire()
    first.release()
    again = RunFolderLock(tmp_path / "run")
    again.acquire()
    again.release()


def test_output_dir_that_is_a_file_is_named(tiny_env, tmp_path) -> None:
    out = tmp_path / "run"
    out.write_text("not a folder")
    with pytest.raises(RunFolderError, match=f"train.output_dir={out} is a file"):
        train(tiny_config(*tiny_env, train__max_steps=1, train__output_dir=out))
    assert out.read_text() == "not a folder"


def test_new_run_refuses_a_finished_run_without_its_checkpoints(finished, tiny_env, tmp_path) -> None:
    """The issue's case: checkpoints/ removed, a new train used to overwrite lora, metrics and config."""
    import shutil

    _, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints")
    before = _snapshot(out)
    other = tiny_config(*tiny_env, train__max_steps=1, train__lr=0.01, train__output_dir=out)
    with pytest.raises(RunFolderError, match=r"already holds files of an earlier run \(README.md, config.yaml, "
                                             r"dip.json, lora.safetensors, memory.json, metrics.csv.*--overwrite"):
        train(other)
    assert _snapshot(out) == before


def test_new_run_refuses_a_folder_with_checkpoints_unless_overwrite(finished, tiny_env, tmp_path) -> None:
    import shutil

    cfg, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _snapshot(out)
    with pytest.raises(RunFolderError, match="already holds checkpoints of an earlier run"):
        train(tiny_config(*tiny_env, train__max_steps=1, train__output_dir=out))
    assert _snapshot(out) == before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"holds files a run does not write \(notes.txt\).*nothing was removed"):
        train(tiny_config(*tiny_env, train__max_steps=1, train__output_dir=out), overwrite=True)
    assert _snapshot(out) == {**before, "notes.txt": b"mine"}
    (out / "notes.txt").unlink()
    result = CliRunner().invoke(app, ["train", *tiny_overrides(*tiny_env), f"train.output_dir={out}",
                                      "train.max_steps=1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]  # the earlier run's step 2 is gone
    assert [r["step"] for r in read_metrics(out)] == [1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_at_the_last_step_finishes_the_run(finished, tiny_env, tmp_path, monkeypatch, signum) -> None:
    cfg, run = finished
    real = trainer_mod.pair_step

    def step_then_signal(policy, backbone, batch, noise, c):
        if noise.step == 2:
            os.kill(os.getpid(), signum)  # arrives mid-step of the last step
        return real(policy, backbone, batch, noise, c)

    monkeypatch.setattr(trainer_mod, "pair_step", step_then_signal)
    out = tmp_path / "run"
    train(tiny_config(*tiny_env, train__max_steps=2, train__checkpoint_every=1, train__output_dir=out))
    lora = load_file(str(out / "lora.safetensors"))
    final = ckpt.load_checkpoint(ckpt.step_dir(out, 2))["lora"]
    assert lora.keys() == final.keys() and all(torch.equal(lora[k], final[k]) for k in lora)
    assert _losses(out) == _losses(run)
    assert not (out / "val" / "samples-step-00000002.png").exists()  # validation skipped on request
    monkeypatch.setattr(trainer_mod, "pair_step", real)
    assert train(tiny_config(*tiny_env, train__max_steps=2, train__checkpoint_every=1, train__output_dir=out),
                 resume=True) == out  # already finished: nothing to do, no error


def test_killed_between_final_checkpoint_and_lora_then_resume_finishes(finished, tiny_env, tmp_path,
                                                                       monkeypatch) -> None:
    from focusdpo import lora as lora_mod

    cfg, run = finished
    out = tmp_path / "run"
    real_save = lora_mod.save_lora

    def die(*_args, **_kwargs):
        raise SystemExit(137)  # stands in for kill -9 right after the final checkpoint

    monkeypatch.setattr(lora_mod, "save_lora", die)
    with pytest.raises(SystemExit):
        train(tiny_config(*tiny_env, train__max_steps=2, train__checkpoint_every=1, train__output_dir=out))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2] and not (out / "lora.safetensors").exists()
    monkeypatch.setattr(lora_mod, "save_lora", real_save)
    result = CliRunner().invoke(app, ["train", "--resume", *tiny_overrides(*tiny_env), f"train.output_dir={out}",
                                      "train.max_steps=2", "train.checkpoint_every=1"])
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
    lora, straight = load_file(str(out / "lora.safetensors")), load_file(str(run / "lora.safetensors"))
    assert lora.keys() == straight.keys() and all(torch.equal(lora[k], straight[k]) for k in lora)
    assert _losses(out) == _losses(run)
    assert (out / "val" / "samples-step-00000002.png").is_file()
    again = CliRunner().invoke(app, ["train", "--resume", *tiny_overrides(*tiny_env), f"train.output_dir={out}",
                                     "train.max_steps=2", "train.checkpoint_every=1"])
    assert again.exit_code == 0 and "already finished at step 2" in again.output, again.output


@pytest.mark.slow
def test_two_train_commands_at_once_the_second_fails_naming_the_first(tiny_env, tmp_path) -> None:
    """The issue's case, as a user starts it: two `focusdpo train` on one train.output_dir (other lr and
    objective). The second stops at once with exit 2 naming the first's pid; the first finishes undisturbed."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    first = subprocess.Popen([sys.executable, "-m", "focusdpo", "train", *tiny_overrides(*tiny_env),
                              f"train.output_dir={out}", "train.max_steps=40", "train.checkpoint_every=5"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text()) and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "focusdpo", "train", *tiny_overrides(*tiny_env),
                                 f"train.output_dir={out}", "train.max_steps=40", "train.lr=0.01",
                                 "train.objective=dpo"], env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first trainer ended before the second started"
        assert second.returncode == 2 and f"pid {first.pid} on " in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert first.wait(timeout=240) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41)) and (out / "lora.safetensors").is_file()
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert "objective: focusdpo" in saved["config_yaml"] and "lr: 0.001" in saved["config_yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, when", [(signal.SIGTERM, "last step"), (signal.SIGINT, "last step"),
                                          (signal.SIGKILL, "final checkpoint")])
def test_real_process_signalled_at_the_end_is_finished_or_finishable(tiny_env, tmp_path, signum, when) -> None:
    """A `focusdpo train` process signalled while it runs its last step (or killed -9 once its final checkpoint
    is on disk): wherever the signal lands, the run is finished, or `--resume` finishes it with exit 0."""
    out, steps = tmp_path / "run", 12
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    args = [sys.executable, "-m", "focusdpo", "train", *tiny_overrides(*tiny_env), f"train.output_dir={out}",
            f"train.max_steps={steps}", "train.checkpoint_every=3"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if when == "last step" and (out / "metrics.csv").is_file() \
                    and len((out / "metrics.csv").read_text().splitlines()) >= steps:  # header + steps - 1 rows
                break
            if when == "final checkpoint" and ckpt.step_dir(out, steps).is_dir():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the signal"
        os.kill(proc.pid, signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["step"] == str(steps)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, steps + 1))
    final = ckpt.load_checkpoint(ckpt.step_dir(out, steps))["lora"]
    lora = load_file(str(out / "lora.safetensors"))
    assert all(torch.equal(lora[k], final[k]) for k in final)
