"""End-to-end runs in subprocesses, as a user starts them: kill -9 + resume, and 2 processes (gloo) vs 1.

Both are marked slow (each takes about a minute on 2 shared CPU cores); CI runs them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from train_fixtures import tiny_overrides

from focusdpo.train import checkpoint as ckpt
from focusdpo.train.run_log import read_metrics

pytestmark = pytest.mark.slow


def _env(tmp_path) -> dict[str, str]:
    # one BLAS thread per process; HF_HOME in tmp so no user accelerate config changes the launch
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),
            "PYTHONUNBUFFERED": "1"}


def _train(tiny_env, tmp_path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "focusdpo", "train", *tiny_overrides(*tiny_env), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_kill_9_then_resume_gives_the_same_per_step_losses(tiny_env, tmp_path) -> None:
    """20 steps straight == (killed with SIGKILL after >= 10 steps) + --resume to 20, step for step."""
    env = _env(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_train(tiny_env, tmp_path, "train.max_steps=20", "train.checkpoint_every=5",
                f"train.output_dir={straight}"), env)
    # a long run, checkpointing every step, killed without warning once step 10 is on disk (possibly mid-write)
    proc = subprocess.Popen(_train(tiny_env, tmp_path, "train.max_steps=1000", "train.checkpoint_every=1",
                                   f"train.output_dir={killed}"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            found = ckpt.list_checkpoints(killed)
            if found and found[-1][0] >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = ckpt.list_checkpoints(killed)[-1][0]
    assert 10 <= killed_at < 20
    _run(_train(tiny_env, tmp_path, "train.max_steps=20", "train.checkpoint_every=1",
                f"train.output_dir={killed}", "--resume"), env)
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 21))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["implicit_acc"] for r in a] == [r["implicit_acc"] for r in b]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_env, tmp_path) -> None:
    """accelerate launch, 2 CPU processes (gloo) x 1 pair == 1 process x 2 pairs; the main process alone writes.

    The objective is dpo with the focus tap on (``focus.log_alignment``): the tap runs through the DDP-wrapped
    module, and the losses must match to 1e-4. FocusDPO's own weights are not compared this tightly: the model's
    prediction differs by ~1e-6 between a batch of 2 and two batches of 1 (batched-matmul rounding), and SPAF's
    top-k and gate are discrete decisions on scores that close, so a token can change sides; ``a`` is checked to
    within one token's share instead.
    """
    env = _env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    same = ("train.objective=dpo", "focus.log_alignment=true")
    _run(_train(tiny_env, tmp_path, "data.batch_size=2", "train.max_steps=3", "train.checkpoint_every=2",
                f"train.output_dir={one}", *same), env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "focusdpo", "train", *tiny_overrides(*tiny_env),
              "data.batch_size=1", "train.max_steps=3", "train.checkpoint_every=2", f"train.output_dir={two}", *same]
    done = _run(launch, {**env, "ACCELERATE_USE_CPU": "1"})
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3]  # one row per step: only the main process logs
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["err_w"] == pytest.approx(ra["err_w"], rel=1e-4)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
        assert 0 < ra["a"] <= 1 and rb["a"] == pytest.approx(ra["a"], abs=0.05)
    assert [s for s, _ in ckpt.list_checkpoints(two)] == [2, 3]
    assert not [p for p in ckpt.checkpoint_dir(two).iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    assert (done.stdout + done.stderr).count("checkpoint " + str(ckpt.step_dir(two, 2))) == 1
    assert (two / "lora.safetensors").is_file()
