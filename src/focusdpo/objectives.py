"""The objective registry (DESIGN 2.6): an objective is one registered :class:`Objective`.

An objective says what the step must compute for it (the reference model's errors, the negative's errors, the
focus weights) and carries its loss. Config validation (``train.objective``), the training step,
``focusdpo.losses.objective_loss`` and ``focusdpo compare``'s variants read this registry, so a new objective is
one module that calls :func:`register_objective` (plus its tests), and nothing else changes. The module must be
imported before a config naming it is validated: import it yourself (library use), or list it as a plug-in
(:mod:`focusdpo.plugins`: an entry point, ``FOCUSDPO_PLUGINS`` or the CLI's ``--plugin MODULE``). The four built-ins
(``sft``, ``dpo``, ``patchdpo``, ``focusdpo``) are registered by :mod:`focusdpo.losses`, which holds their math.

The loss signature, shared by every objective::

    loss(pol_w, pol_l, ref_w, ref_l, weights, m_prior_tok, beta, lambda_sft, patch_alpha) -> (loss [B], metrics)

``pol_w``/``pol_l``: ``[B, N]`` policy token errors on the positive / negative (``pol_l`` None unless
``needs_negative``); ``ref_w``/``ref_l``: the reference model's (None unless ``needs_reference``); ``weights``: the
focus weights ``[B, N]`` or a pair ``(W_w, W_l)`` (None unless ``uses_focus``); ``m_prior_tok``: ``[B, N]`` area
fraction of ``M_prior`` per token; the rest are ``cfg.loss`` constants. ``metrics`` maps names to detached ``[B]``
tensors and holds at least ``loss`` and ``err_w``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Objective:
    """One training objective.

    Args:
        name: the ``train.objective`` value.
        needs_reference: the step computes the frozen reference model's errors (adapters off, no grad).
        needs_negative: the step runs the negative of each pair too (same noise and timestep).
        uses_focus: the step computes the focus (SPAF tap + DPCE + gate) and passes its weights ``W``.
        loss: the loss function (signature in the module doc).
        summary: one line for help texts.
    """

    name: str
    needs_reference: bool
    needs_negative: bool
    uses_focus: bool
    loss: LossFn
    summary: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or "," in self.name:
            raise ValueError(f"objective name {self.name!r} is invalid: a non-empty word without commas or spaces "
                             f"around it")
        if self.needs_reference and not self.needs_negative:
            raise ValueError(f"objective {self.name!r}: needs_reference without needs_negative is not supported "
                             f"(the step runs the reference on the [positive; negative] batch)")


_REGISTRY: dict[str, Objective] = {}


def register_objective(objective: Objective, replace: bool = False) -> Objective:
    """Add ``objective`` to the registry; a second one with the same name raises unless ``replace``."""
    if objective.name in _REGISTRY and not replace:
        raise ValueError(f"objective {objective.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[objective.name] = objective
    return objective


def _ensure_builtins() -> None:
    import focusdpo.losses  # noqa: F401  (registers sft, dpo, patchdpo, focusdpo)
    from focusdpo.plugins import load_plugins

    load_plugins()


def objective_names() -> tuple[str, ...]:
    """Registered objective names, built-ins first, in registration order."""
    _ensure_builtins()
    return tuple(_REGISTRY)


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; an unknown name raises ``ValueError`` listing the allowed ones."""
    _ensure_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"objective {name!r} is unknown: allowed {', '.join(_REGISTRY)} (or register one with "
                         f"focusdpo.objectives.register_objective)")
    return _REGISTRY[name]
