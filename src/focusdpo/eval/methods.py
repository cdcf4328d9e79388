"""The methods an evaluation compares: the base model (``None``) or a trained run folder.

A run folder (written by ``focusdpo train``) holds ``config.yaml`` (the resolved config of the run) and, at the
end, ``lora.safetensors``. Its method name is the run's objective (``sft``, ``dpo``, ``patchdpo``,
``focusdpo``); the base model is ``base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from focusdpo.backbones import Backbone, load_backbone
from focusdpo.config import Config

BASE = "base"


class MethodError(ValueError):
    """A run folder cannot be evaluated; the message names the folder and the fix."""


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a run saved (``run_dir/config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise MethodError(f"--run {run_dir}: no config.yaml; pass a folder written by `focusdpo train`")
    return Config.from_yaml(path.read_text())


def resolve_methods(run_dirs: Sequence[str | Path], base: bool) -> dict[str, Path | None]:
    """``{method name: run folder | None (base)}``, base first; runs are named by their objective.

    Two runs with the same objective are told apart by their folder name (``focusdpo-<folder>``).
    """
    if not run_dirs and not base:
        raise MethodError("nothing to evaluate: pass --base and/or one or more --run DIR")
    methods: dict[str, Path | None] = {BASE: None} if base else {}
    objectives = [run_config(d).train.objective for d in run_dirs]
    for d, obj in zip(run_dirs, objectives, strict=True):
        name = obj if objectives.count(obj) == 1 else f"{obj}-{Path(d).resolve().name}"
        if name in methods:
            raise MethodError(f"--run {d}: method name {name!r} is used twice; pass each run folder once")
        methods[name] = Path(d)
    return methods


def load_method(cfg: Config, run_dir: str | Path | None, device: torch.device | str | None = None,
                check_world: bool = True, allow_checkpoint: bool = False) -> Backbone:
    """The base backbone of ``cfg.model`` (``run_dir`` None), or the run's backbone with its final LoRA loaded.

    With ``check_world`` (the toy benchmark) a run must have been trained on the world ``cfg`` evaluates (same
    held-out identities), else :class:`MethodError` names the differing fields. ``allow_checkpoint``: an
    unfinished run gives the LoRA of its newest checkpoint (focus maps during training) instead of an error.
    """
    from focusdpo.train.lora import load_lora

    if run_dir is None:
        return load_backbone(cfg.model, device)
    run_cfg = run_config(run_dir)
    if check_world and run_cfg.world != cfg.world:
        diff = {k: (getattr(run_cfg.world, k), getattr(cfg.world, k)) for k in vars(cfg.world)
                if getattr(run_cfg.world, k) != getattr(cfg.world, k)}
        raise MethodError(f"--run {run_dir} was trained on another world {diff} (run, eval config): evaluate it "
                          f"with --config {Path(run_dir) / 'config.yaml'} or matching world.* overrides")
    lora_file = Path(run_dir) / "lora.safetensors"
    if not lora_file.is_file() and allow_checkpoint:
        from focusdpo.train import checkpoint as ckpt

        latest = ckpt.latest_checkpoint(run_dir)
        lora_file = lora_file if latest is None else latest / "lora.safetensors"
    if not lora_file.is_file():
        raise MethodError(f"--run {run_dir}: no lora.safetensors (the run has not finished); finish it with "
                          f"`focusdpo train --resume` or evaluate a finished run")
    backbone = load_backbone(run_cfg.model, device)
    backbone.add_lora(run_cfg.lora)
    backbone.load_lora_state_dict(load_lora(lora_file))
    return backbone
