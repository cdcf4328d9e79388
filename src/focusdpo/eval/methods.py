"""The methods an evaluation compares: the base model (``None``) or a trained run folder.

A run folder (written by ``focusdpo train``) holds ``config.yaml`` (the resolved config of the run) and, at the
end, ``lora.safetensors``. Its method name is the run's objective (``sft``, ``dpo``, ``patchdpo``,
``focusdpo``); the base model is ``base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from focusdpo.runs import MethodError, load_method, run_config  # noqa: F401  (load_method: re-exported)

BASE = "base"


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
