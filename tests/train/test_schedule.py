"""The one learning-rate schedule (diffusers' get_scheduler) of the trainer and pretraining."""

from __future__ import annotations

import math

import pytest
import torch

from focusdpo.config import ConfigError, load_config
from focusdpo.train.schedule import make_scheduler


def _lrs(schedule: str, warmup: int, steps: int, lr: float = 1.0) -> list[float]:
    cfg = load_config(None, [f"train.schedule={schedule}", f"train.warmup_steps={warmup}",
                             f"train.max_steps={steps}", f"train.lr={lr}"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = make_scheduler(opt, cfg.train)
    out = []
    for _ in range(steps + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_known_values_of_each_shape() -> None:
    """Warm-up i / w from 0; constant 1; linear (T - i) / (T - w); cosine 0.5 (1 + cos(pi (i - w) / (T - w)))."""
    assert _lrs("constant", 4, 6) == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1])
    assert _lrs("linear", 2, 6) == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25, 0])
    cos = _lrs("cosine", 2, 10)
    assert cos[:3] == pytest.approx([0, 0.5, 1])
    assert cos[6] == pytest.approx(0.5) and cos[10] == pytest.approx(0, abs=1e-12)
    assert cos[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert _lrs("constant", 0, 3, lr=0.01) == pytest.approx([0.01] * 4)  # no warm-up: lr from the first step


def test_state_dict_round_trip_resumes_the_exact_rates() -> None:
    cfg = load_config(None, ["train.schedule=cosine", "train.warmup_steps=3", "train.max_steps=20"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    a = make_scheduler(opt, cfg.train)
    for _ in range(7):
        opt.step()
        a.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    b = make_scheduler(opt2, cfg.train)
    opt2.load_state_dict(opt.state_dict())  # what a checkpoint restores: optimizer, then scheduler
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert b.get_last_lr() == a.get_last_lr() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, a), (opt2, b)):
            o.step()
            s.step()


def test_unknown_schedule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.schedule='step' is invalid: allowed one of constant, linear"):
        load_config(None, ["train.schedule=step"])


def test_a_killed_run_resumes_on_the_same_schedule(tiny_env, tmp_path, monkeypatch) -> None:
    """Cosine with warm-up, killed after the step-3 checkpoint and resumed: the same lr and losses as straight."""
    from train_fixtures import tiny_config

    from focusdpo.train import trainer as trainer_mod
    from focusdpo.train.run_log import read_metrics

    kw = {"train__warmup_steps": 2, "train__schedule": "cosine", "train__max_steps": 5, "train__checkpoint_every": 3}
    trainer_mod.train(tiny_config(*tiny_env, train__output_dir=tmp_path / "a", **kw))
    real, calls = trainer_mod._optimizer_step, []

    def dies_at_step_4(run, batches):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(run, batches)

    monkeypatch.setattr(trainer_mod, "_optimizer_step", dies_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        trainer_mod.train(tiny_config(*tiny_env, train__output_dir=tmp_path / "b", **kw))
    monkeypatch.setattr(trainer_mod, "_optimizer_step", real)
    trainer_mod.train(tiny_config(*tiny_env, train__output_dir=tmp_path / "b", **kw), resume=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["lr"] for r in b] == [r["lr"] for r in a] == pytest.approx([0, 5e-4, 1e-3, 5e-4 * (1 + math.cos(
        math.pi / 3)), 5e-4 * (1 + math.cos(2 * math.pi / 3))])
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
