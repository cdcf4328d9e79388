"""The learning-rate schedule of both the trainer and pretraining: diffusers' ``get_scheduler``.

``train.schedule`` names the shape after the warm-up and ``train.warmup_steps`` its length; both map onto
``diffusers.optimization.get_scheduler`` (the schedule diffusers' own training scripts use), so the factor of
optimizer step ``i`` (0-based) is diffusers':

- warm-up, ``i < warmup_steps``: ``i / warmup_steps`` (the first step runs at lr 0, diffusers' convention);
- ``constant``: 1 (diffusers ``constant_with_warmup``);
- ``linear``: ``(max_steps - i) / (max_steps - warmup_steps)``, 0 at ``max_steps``;
- ``cosine``: ``0.5 * (1 + cos(pi * (i - warmup_steps) / (max_steps - warmup_steps)))``, 0 at ``max_steps``.

The result is a ``torch.optim.lr_scheduler.LambdaLR``: its ``state_dict`` (the step count) is what a checkpoint
keeps, and loading it into a fresh schedule built from the same config resumes the exact learning rates.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from focusdpo.config import TrainConfig

# train.schedule -> diffusers SchedulerType name
DIFFUSERS_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_scheduler(optimizer: Optimizer, train: TrainConfig) -> LambdaLR:
    """diffusers' schedule for ``train.schedule`` with ``train.warmup_steps`` over ``train.max_steps`` steps;
    step it once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(DIFFUSERS_NAMES[train.schedule], optimizer, num_warmup_steps=train.warmup_steps,
                         num_training_steps=train.max_steps)
