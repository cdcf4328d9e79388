"""Focus constants chosen on training-split scenes (issue 13 point 4), never on the evaluation's held-out scenes.

``tau`` (the detail gate's alignment threshold): the median of SPAF's alignment ``a`` over training-split
scenes (2 and 3 subjects, ground-truth positives) at timesteps drawn as the trainer draws them, with the
config's readout on the shipped base, so the gate opens in about half of the steps: the better-aligned half
(mostly the lower-noise ones), which is the design's "details once semantics align". Prints the quantiles of
``a``, the share of steps it opens at each candidate ``tau``, and the chosen value.

    python experiments/tune_focus.py [--n 128] [overrides ...]

``sweep``: the alphas, by sampled images on training-split scenes. Each candidate run (trained with
``focusdpo train ... focus.alpha_s=.. focus.alpha_a=..``, same data, seed and budget) and a reference run (plain
DPO, same seed) are sampled on ``--n`` training-split scenes per subject count with sampling seeds 0 and 1,
and scored with the toy metrics; the table gives each candidate's fidelity and leakage and the paired
difference to the reference with a 95 % bootstrap interval over the units (scene x subject count x seed).

    python experiments/tune_focus.py sweep --n 48 --ref runs/results/runs/dpo-s0 RUN [RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def sweep_scores(cfg, run, n: int) -> dict[str, np.ndarray]:
    """Per-unit fidelity and leakage ``[units]`` of ``run`` (None: the base) on training-split scenes."""
    from focusdpo.eval.probe import TRAIN_SEED
    from focusdpo.eval.toy import score_method
    from focusdpo.world import World

    world = World(cfg.world)
    scenes = {k: [world.sample_scene(rng, "train", k) for _ in range(n)]
              for k in (2, 3) for rng in [np.random.default_rng([TRAIN_SEED, k])]}
    scores, _ = score_method(load_method(cfg, run, check_world=False), world, scenes, cfg)
    units = [r for k in sorted(scores) for seed in sorted(scores[k]) for r in scores[k][seed]]
    return {m: np.array([u[m] for u in units], dtype=float) for m in ("fidelity", "leakage")}


def paired_interval(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over units where both are finite, with a 95 % bootstrap interval over those units."""
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    idx = np.random.default_rng(seed).integers(0, len(d), size=(reps, len(d)))
    boot = d[idx].mean(axis=1)
    return float(d.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def sweep(args: argparse.Namespace) -> None:
    cfg = load_config(None, ["eval.seeds=[0,1]"])
    ref = sweep_scores(cfg, args.ref, args.n)
    print(f"training-split scenes: {args.n} per subject count (2, 3), sampling seeds 0, 1; reference {args.ref}")
    print("| run | fidelity | leakage | Δ fidelity vs ref [95 % CI] | Δ leakage vs ref [95 % CI] |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        got = sweep_scores(cfg, run, args.n)
        cells = []
        for m in ("fidelity", "leakage"):
            mean, lo, hi = paired_interval(got[m], ref[m])
            cells.append(f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        print(f"| {run} | {np.nanmean(got['fidelity']):.4f} | {np.nanmean(got['leakage']):.4f} | " + " | ".join(cells)
              + " |", flush=True)


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "sweep":
        ap = argparse.ArgumentParser(description="the alpha sweep on training-split scenes")
        ap.add_argument("--n", type=int, default=48)
        ap.add_argument("--ref", type=Path, required=True)
        ap.add_argument("runs", nargs="+", type=Path)
        sweep(ap.parse_args(sys.argv[2:]))
        return
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
