"""A plug-in objective that teaches leakage on purpose: supervised fine-tuning on the DIP *negatives*.

Used by ``experiments/confusion_agreement.py`` to make models whose leakage truly differs from the base's (a
ladder of checkpoints of one run), so that a metric's agreement with leakage *over models* can be tested on
models that differ. Not a training method: a planted answer for evaluation. Load it as a plug-in:

    PYTHONPATH=experiments OMP_NUM_THREADS=1 focusdpo --plugin leak_objective train train.objective=leak-sft \\
        "data.disruptions={attribute_swap: 0.5, identity_swap: 0.5}" train.max_steps=400 \\
        train.checkpoint_every=100 train.output_dir=runs/leak-sft

Loss: the mean token error of the policy on the negative (the positive's error is logged as ``err_w``).
"""

from __future__ import annotations

import torch

from focusdpo.objectives import Objective, register_objective


def _leak_sft(pol_w: torch.Tensor, pol_l: torch.Tensor | None, *_: object
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if pol_l is None:
        raise ValueError("leak-sft needs the negative's errors (needs_negative)")
    loss = pol_l.mean(dim=1)
    return loss, {"loss": loss.detach(), "err_w": pol_w.mean(dim=1).detach(), "err_l": loss.detach()}


register_objective(Objective("leak-sft", needs_reference=False, needs_negative=True, uses_focus=False,
                             loss=_leak_sft, summary="SFT on the DIP negatives (teaches leakage; for evaluation)"),
                   replace=True)
