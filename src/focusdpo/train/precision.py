"""Which mixed precision a run uses, and why (issue 18 point 3).

``train.mixed_precision`` is ``auto``, ``no``, ``bf16`` or ``fp16``. ``accelerate launch`` passes its own
setting to the processes it starts as ``ACCELERATE_MIXED_PRECISION`` (from ``--mixed_precision``, else from
the accelerate config file, else ``no``; a plain ``focusdpo train`` has none). The rule:

- an explicit ``no``/``bf16``/``fp16`` in the config wins, and the run says so when the launcher asked for
  something else;
- ``auto`` defers to the launcher's setting when there is one;
- ``auto`` without a launcher setting: ``bf16`` on a CUDA GPU that has it, else ``no`` (fp32). fp16 is never
  chosen silently (it needs loss scaling and can overflow): ask for it with ``train.mixed_precision=fp16`` or
  ``accelerate launch --mixed_precision fp16``, which ``auto`` follows on a GPU without bf16.

fp16 needs a CUDA device; a launcher value outside ``no``/``bf16``/``fp16`` (``fp8``) is refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from focusdpo.config import ConfigError

ENV = "ACCELERATE_MIXED_PRECISION"
SUPPORTED = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """The resolved setting: ``value`` for ``Accelerator(mixed_precision=...)``; ``reason`` one line saying
    which setting won and why (printed and logged by the trainer)."""

    value: str
    reason: str


def resolve_mixed_precision(setting: str, env: Mapping[str, str] | None = None, cuda: bool | None = None,
                            bf16: bool | None = None) -> Precision:
    """``train.mixed_precision`` + the launcher's ``ACCELERATE_MIXED_PRECISION`` + the device -> :class:`Precision`.

    ``env`` defaults to ``os.environ``; ``cuda`` (a CUDA device will be used) and ``bf16`` (it supports bf16)
    default to what torch reports, with ``ACCELERATE_USE_CPU`` meaning no CUDA. Raises :class:`ConfigError`
    for fp16 without CUDA and for a launcher value this trainer does not support.
    """
    env = os.environ if env is None else env
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available() and env.get("ACCELERATE_USE_CPU", "").strip().lower() not in (
            "1", "true", "yes", "on")
        bf16 = cuda and torch.cuda.is_bf16_supported() if bf16 is None else bf16
    launcher = env.get(ENV, "").strip().lower() or None
    if setting != "auto":
        value = setting
        reason = f"train.mixed_precision={setting} (set in the config)"
        if launcher is not None and launcher != setting:
            reason += (f"; it wins over the launcher's {ENV}={launcher}: set train.mixed_precision=auto to "
                       f"use the launcher's")
    elif launcher is not None:
        if launcher not in SUPPORTED:
            raise ConfigError(f"{ENV}={launcher!r} (from accelerate launch --mixed_precision or its config file) "
                              f"is invalid with train.mixed_precision=auto: allowed {', '.join(SUPPORTED)}")
        value = launcher
        reason = (f"train.mixed_precision=auto follows the launcher: {ENV}={launcher} (accelerate launch "
                  f"--mixed_precision or its config file)")
    elif cuda and bf16:
        value, reason = "bf16", "train.mixed_precision=auto: bf16, the GPU supports it"
    elif cuda:
        value, reason = "no", ("train.mixed_precision=auto: fp32, the GPU has no bf16 (fp16 only when asked: "
                               "train.mixed_precision=fp16 or accelerate launch --mixed_precision fp16)")
    else:
        value, reason = "no", "train.mixed_precision=auto: fp32, no CUDA device"
    if value == "fp16" and not cuda:
        source = "train.mixed_precision" if setting == "fp16" else ENV
        raise ConfigError(f"{source}='fp16' is invalid without a CUDA device: allowed auto, no, bf16")
    return Precision(value, reason)
