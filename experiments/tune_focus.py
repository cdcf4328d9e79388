"""Focus constants chosen on training-split scenes (issue 13 point 4), never on the evaluation's held-out scenes.

``tau`` (the detail gate's alignment threshold): the median of SPAF's alignment ``a`` over training-split
scenes (2 and 3 subjects, ground-truth positives) at timesteps drawn as the trainer draws them, with the
config's readout on the shipped base, so the gate opens in about half of the steps: the better-aligned half
(mostly the lower-noise ones), which is the design's "details once semantics align". Prints the quantiles of
``a``, the share of steps it opens at each candidate ``tau``, and the chosen value.

    python experiments/tune_focus.py [--n 128] [overrides ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from focusdpo.config import load_config
from focusdpo.eval.methods import load_method
from focusdpo.eval.probe import _encode, _rule_stats, toy_batches, train_sigmas
from focusdpo.focus import readout_scores


def alignment_at_train_timesteps(cfg, n: int, seed: int = 0) -> np.ndarray:
    """Per-positive ``a`` ``[2n]`` on ``n`` training-split scenes per subject count (2, 3), one trainer ``s`` each."""
    backbone = load_method(cfg, None)
    backbone.tap_layer = cfg.focus.tap_layer
    gen = torch.Generator().manual_seed(seed)
    values = []
    for batch in toy_batches(cfg, n, split="train"):
        x0, refs, text, regions, ref_masks = _encode(backbone, batch)
        b = x0.tokens.shape[0]
        s = torch.from_numpy(train_sigmas(cfg, x0.tokens.shape[1], b)).float()[torch.randperm(b, generator=gen)]
        eps = torch.randn(x0.tokens.shape, generator=gen)
        x_t = (1 - s[:, None, None]) * x0.tokens + s[:, None, None] * eps
        with torch.no_grad():
            _, tap = backbone.predict(x_t, s, text, refs, x0.grid, tap=True, ref_masks=ref_masks)
        scores = readout_scores(cfg.focus.readout, tap.field, tap.target, tap.refs, ref_masks)
        values.append(_rule_stats(scores, regions, cfg.focus.rho)[0].numpy())
    return np.concatenate(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128, help="Training-split scenes per subject count.")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, args.overrides)
    a = alignment_at_train_timesteps(cfg, args.n)
    print(f"readout {cfg.focus.readout}@{cfg.focus.tap_layer}: {len(a)} training-split positives at trainer timesteps")
    print("a quantiles 10/25/50/75/90 %: " + " / ".join(f"{q:.3f}" for q in np.quantile(a, [.1, .25, .5, .75, .9])))
    for tau in (0.5, 0.7, 0.8, 0.85, 0.9):
        print(f"tau {tau}: gate open in {np.mean(a >= tau):.0%} of steps")
    print(f"chosen tau = median a = {np.median(a):.2f}")


if __name__ == "__main__":
    main()
