"""Atomic checkpoints: round trip, RNG states, leftovers of a killed writer, incomplete folders."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from focusdpo.train import checkpoint as ckpt


def _write(run, step: int) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5)
    ckpt.save_checkpoint(run, ckpt.TrainState(step, 1, 3, 1), {"w.lora_A.weight": torch.arange(6.0).reshape(2, 3)},
                         opt.state_dict(), sched.state_dict(), [ckpt.capture_rng()], "train:\n  seed: 0\n")


def test_round_trip(tmp_path) -> None:
    _write(tmp_path, 5)
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert loaded["state"] == ckpt.TrainState(5, 1, 3, 1)
    assert torch.equal(loaded["lora"]["w.lora_A.weight"], torch.arange(6.0).reshape(2, 3))
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    assert loaded["scheduler"]["base_lrs"] == [0.1]
    assert loaded["config_yaml"] == "train:\n  seed: 0\n"


def test_rng_states_restore_every_stream() -> None:
    state = ckpt.capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(5)  # move every stream on
    ckpt.restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_rng_state_survives_weights_only_load(tmp_path) -> None:
    torch.save([ckpt.capture_rng()], tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)[0]
    expected = np.random.rand()
    ckpt.restore_rng(state)
    assert np.random.rand() == expected


def test_temp_folders_of_a_killed_writer_are_invisible_and_cleaned(tmp_path) -> None:
    _write(tmp_path, 2)
    leftover = ckpt.temp_dir(tmp_path, 4)
    leftover.mkdir()
    (leftover / "lora.safetensors").write_bytes(b"half a file")
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 2)
    assert ckpt.clean_stale(tmp_path) == [leftover]
    assert not leftover.exists() and ckpt.step_dir(tmp_path, 2).is_dir()


def test_checkpoints_sort_by_step_and_prune_keeps_the_newest(tmp_path) -> None:
    for step in (10, 2, 30):
        _write(tmp_path, step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 10, 30]
    ckpt.prune(tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 30]


def test_incomplete_checkpoint_names_the_missing_files(tmp_path) -> None:
    _write(tmp_path, 1)
    (ckpt.step_dir(tmp_path, 1) / "optimizer.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing optimizer.pt"):
        ckpt.load_checkpoint(ckpt.step_dir(tmp_path, 1))
