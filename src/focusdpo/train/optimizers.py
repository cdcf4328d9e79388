"""``train.optimizer``: the optimizer of the LoRA parameters (issue 17 point 2).

- ``adamw``: ``torch.optim.AdamW`` (two float32 moments: 8 bytes per trainable parameter).
- ``adamw8bit``: bitsandbytes ``AdamW8bit`` (blockwise 8-bit moments: about 2 bytes per parameter; tensors under
  4096 elements keep 32-bit state, bitsandbytes' ``min_8bit_size``). bitsandbytes >= 0.45 runs it on CUDA and, from
  0.48, on the CPU; :func:`check_optimizer` tries one step on the device and names the reason when it cannot.
- ``adafactor``: ``torch.optim.Adafactor`` (PyTorch >= 2.5; factored second moment, no first moment: a row and
  a column vector per matrix), else ``transformers.optimization.Adafactor`` with a fixed learning rate.

All three take ``train.lr`` and ``train.weight_decay`` and save and load their state through ``state_dict``, so a
resumed run continues exactly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from focusdpo.config import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def check_optimizer(name: str, device: torch.device | str) -> None:
    """Raise :class:`ConfigError` when ``train.optimizer=name`` cannot run on ``device``, naming why."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={name!r} is invalid: allowed one of {', '.join(OPTIMIZERS)}")
    if name != "adamw8bit":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.optimizer='adamw8bit' needs bitsandbytes, which is not installed: "
                          "pip install 'focusdpo[quant]'")
    device = torch.device(device)
    try:  # one step on a 4096-element tensor: the smallest that gets 8-bit state
        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        opt = _adamw8bit([p], 1e-3, 0.0)
        p.grad = torch.ones_like(p)
        opt.step()
    except Exception as e:  # noqa: BLE001 - whatever bitsandbytes raises for a device it does not support
        raise ConfigError(f"train.optimizer='adamw8bit' cannot run on {device} with bitsandbytes "
                          f"({type(e).__name__}: {str(e)[:200]}): allowed adamw or adafactor here") from e


def _adamw8bit(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def make_optimizer(name: str, params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """The optimizer ``name`` (:data:`OPTIMIZERS`) over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        return _adamw8bit(params, lr, weight_decay)
    if name == "adafactor":
        if hasattr(torch.optim, "Adafactor"):
            return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise ConfigError(f"train.optimizer={name!r} is invalid: allowed one of {', '.join(OPTIMIZERS)}")
