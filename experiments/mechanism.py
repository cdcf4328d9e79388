"""How FocusDPO acts, measured (issue 13 point 5): where its weights go, whether it moves the policy's attention
field, and whether the subjects it flags leak differently.

Three measurements, each printed as a markdown table:

1. ``weights``: from each run's ``metrics.csv`` (mean over all steps): the mean focus weight on confused
   (``M_s``) and aligned (``A``) tokens, inside and outside ``M_prior``, the alignment ``a`` and the gate.
2. ``field``: the alignment ``a`` and confusion of the *policy's* attention field (the config's readout) on the
   evaluation's held-out scenes at s in {0.1, ..., 0.9} and under the trainer's timesteps, for the base and
   for each run (``focusdpo.eval.probe``), so a change in where the model attends shows up directly.
3. ``flags``: which held-out subjects the base's focus sees as the most confused (the lowest third of subjects by
   their own share of aligned tokens, averaged over 4 trainer-distributed timesteps; an absolute threshold of
   0.5 flags only 2 of 320), written as JSON for splitting each method's per-subject leakage by that flag.

    python experiments/mechanism.py weights RUN [RUN ...]
    python experiments/mechanism.py field --n 32 --out runs/mechanism/field.json RUN [RUN ...]
    python experiments/mechanism.py flags --n 64 --out runs/mechanism/flags.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from focusdpo.config import load_config
from focusdpo.eval.methods import load_method
from focusdpo.eval.probe import SIGMAS, _encode, probe_batch, summarise_probe, toy_batches, train_sigmas
from focusdpo.focus import claim_tokens, focus_sets, readout_scores, subject_top_k

WEIGHT_COLUMNS = ("w_confused", "w_aligned", "w_in_prior", "w_out_prior", "a", "gate")


def run_weights(run: Path) -> dict[str, float]:
    """Means over the steps of ``run/metrics.csv`` of :data:`WEIGHT_COLUMNS` (NaN where never logged)."""
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for col in WEIGHT_COLUMNS:
        vals = [float(r[col]) for r in rows if r.get(col) not in (None, "")]
        vals = [v for v in vals if math.isfinite(v)]
        out[col] = float(np.mean(vals)) if vals else float("nan")
    return out


def field_alignment(cfg, run: Path | None, n: int, draws: int = 2) -> dict:
    """``a``/confusion per ``s`` and ``a_train`` of the config's readout on the policy of ``run`` (None: base)."""
    backbone = load_method(cfg, run, check_world=False, allow_checkpoint=True)
    backbone.trainable().eval()
    block = cfg.focus.tap_layer
    raw: dict = {}
    for i, batch in enumerate(toy_batches(cfg, n)):
        part = probe_batch(backbone, batch, [block], cfg, draws, seed=1000 + i)
        for name, by_s in part.items():
            for s, (a, c) in by_s.items():
                slot = raw.setdefault(name, {}).setdefault(s, [np.empty(0), np.empty(0)])
                slot[0], slot[1] = np.concatenate([slot[0], a]), np.concatenate([slot[1], c])
    summary = summarise_probe(raw, train_sigmas(cfg, 64))
    backbone.tap_layer = block
    return summary[f"{cfg.focus.readout}@{backbone.tap_layer}"]


def subject_flags(cfg, n: int, draws: int = 4) -> dict[str, dict]:
    """Per held-out scene and subject: ``own`` (share of its region the right subject claims, mean over ``draws``
    trainer timesteps, base policy) and ``flag`` (own alignment in the lowest third over all subjects):
    ``{"2": {"own": [[...] per scene], "flag": [[...]]}, "3": ...}``."""
    backbone = load_method(cfg, None)
    backbone.tap_layer = cfg.focus.tap_layer
    gen = torch.Generator().manual_seed(7)
    own_by_k: dict[str, torch.Tensor] = {}
    for batch in toy_batches(cfg, n, batch_size=n):
        x0, refs, text, regions, ref_masks = _encode(backbone, batch)
        b, k = regions.shape[:2]
        own = torch.zeros(b, k)
        for _ in range(draws):
            s = torch.from_numpy(train_sigmas(cfg, x0.tokens.shape[1], b)).float()[torch.randperm(b, generator=gen)]
            x_t = (1 - s[:, None, None]) * x0.tokens + s[:, None, None] * torch.randn(x0.tokens.shape, generator=gen)
            with torch.no_grad():
                _, tap = backbone.predict(x_t, s, text, refs, x0.grid, tap=True, ref_masks=ref_masks)
            scores = readout_scores(cfg.focus.readout, tap.field, tap.target, tap.refs, ref_masks)
            matches = claim_tokens(scores, subject_top_k(regions, cfg.focus.rho))
            member = focus_sets(matches, regions)["member"]
            own += ((matches & member).flatten(2).sum(2) / member.flatten(2).sum(2).clamp_min(1)).float()
        own_by_k[str(k)] = own / draws
    cut = float(torch.quantile(torch.cat([v.flatten() for v in own_by_k.values()]), 1 / 3))
    return {k: {"own": v.tolist(), "flag": (v < cut).tolist(), "cut": cut} for k, v in own_by_k.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["weights", "field", "flags"])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_config(None, [])
    if args.what == "weights":
        print("| run | " + " | ".join(WEIGHT_COLUMNS) + " |\n|---" * 1 + "|---" * len(WEIGHT_COLUMNS) + "|")
        for run in args.runs:
            w = run_weights(run)
            print(f"| {run.name} | " + " | ".join(f"{w[c]:.3f}" for c in WEIGHT_COLUMNS) + " |")
        return
    if args.what == "field":
        result = {"base": field_alignment(cfg, None, args.n)}
        for run in args.runs:
            result[run.name] = field_alignment(cfg, run, args.n)
        sig = [f"{s:g}" for s in SIGMAS]
        print("| policy | " + " | ".join(f"a @ {s}" for s in sig) + " | a_train | confusion @ 0.5 |")
        print("|---" * (len(sig) + 3) + "|")
        for name, v in result.items():
            print(f"| {name} | " + " | ".join(f"{v['a'][s]:.3f}" for s in sig)
                  + f" | {v['a_train']:.3f} | {v['confusion']['0.5']:.4f} |")
    else:
        result = subject_flags(cfg, args.n)
        for k, v in result.items():
            flat = [f for row in v["flag"] for f in row]
            own = np.array(v["own"]).flatten()
            print(f"K={k}: {sum(flat)} of {len(flat)} subjects flagged (own alignment < {v['cut']:.3f}); "
                  f"mean own alignment {own.mean():.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
