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
    python experiments/mechanism.py flagged --metrics runs/res-abl/eval/metrics.json --flags runs/mechanism/flags.json

``flagged`` splits every method's per-subject leakage (``units.subjects`` of the evaluation's ``metrics.json``)
by the base's flag and gives, for flagged and for other subjects, the method's mean and its paired difference
to ``base`` and to ``dpo`` (mean over training seeds; 95 % bootstrap interval over scenes x sampling seeds,
the training seeds resampled too).
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


def _subject_matrix(entry: dict, flags: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``values [U, 3]`` (per-subject scores, NaN-padded to 3 subjects) and ``flagged [U, 3]`` bool."""
    keys, rows = entry["units"]["keys"], entry["units"]["subjects"][metric]
    values = np.full((len(keys), 3), np.nan)
    flagged = np.zeros((len(keys), 3), dtype=bool)
    for u, ((k, _seed, _sample, scene), row) in enumerate(zip(keys, rows, strict=True)):
        values[u, : len(row)] = [np.nan if v is None else v for v in row]
        flagged[u, : len(row)] = flags[str(k)]["flag"][scene]
    return values, flagged


def flagged_table(metrics: dict, flags: dict, metric: str = "leakage", reps: int = 2000) -> list[str]:
    """Markdown rows: method, flagged / other means, and paired differences to base and dpo with intervals.

    A replicate draws units (scene x subject count x sampling seed) and each method's training seeds with
    replacement; a method's value is the mean over its drawn seeds of the per-run mean over the drawn units'
    subjects of the group.
    """
    per_method: dict[str, list[np.ndarray]] = {}
    mask = None
    for name, entry in metrics.items():
        values, mask = _subject_matrix(entry, flags, metric)
        per_method.setdefault(name.split("@")[0], []).append(values)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, mask.shape[0], size=(reps, mask.shape[0]))

    def group(values: np.ndarray, sel: np.ndarray) -> tuple[float, np.ndarray]:
        v = np.where(sel, values, np.nan)
        return float(np.nanmean(v)), np.nanmean(v[draws].reshape(reps, -1), axis=1)

    stats = {}
    for m, runs in per_method.items():
        for gi, sel in enumerate((mask, ~mask)):
            points, boots = zip(*(group(v, sel) for v in runs), strict=True)
            seeds = rng.integers(0, len(runs), size=(reps, len(runs)))
            stats[(m, gi)] = (float(np.mean(points)), np.stack(boots)[seeds, np.arange(reps)[:, None]].mean(axis=1))
    rows = []
    for m in sorted(per_method):
        cells = []
        for gi in (0, 1):
            point, boot = stats[(m, gi)]
            cells.append(f"{point:.4f}")
            for ref in ("base", "dpo"):
                if m == ref or ref not in per_method:
                    cells.append("")
                    continue
                ref_point, ref_boot = stats[(ref, gi)]
                lo, hi = np.quantile(boot - ref_boot, [0.025, 0.975])
                cells.append(f"{point - ref_point:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "flagged":
        ap = argparse.ArgumentParser(description="leakage of flagged vs other subjects")
        ap.add_argument("--metrics", type=Path, required=True)
        ap.add_argument("--flags", type=Path, required=True)
        ap.add_argument("--metric", default="leakage")
        args = ap.parse_args(sys.argv[2:])
        flags = json.loads(args.flags.read_text())
        n_flag = sum(f for v in flags.values() for row in v["flag"] for f in row)
        n_all = sum(len(row) for v in flags.values() for row in v["flag"])
        print(f"{args.metric} of the {n_flag} flagged subjects (of {n_all}) and of the others:\n")
        print("| method | flagged | Δ vs base | Δ vs dpo | others | Δ vs base | Δ vs dpo |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(flagged_table(json.loads(args.metrics.read_text()), flags, args.metric)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["weights", "field", "flags"])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_intermixed_args()
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
            result[f"{run.parent.parent.name}/{run.name}"] = field_alignment(cfg, run, args.n)
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
