"""On-policy DIP, measured (issue 16 point 4): the paired differences between offline and on-policy training and
the refresh's cost, from a `focusdpo compare` folder.

    focusdpo compare --train-only --variants focusdpo-onpolicy,focusdpo,dpo-onpolicy,dpo --seeds 0,1,2 \\
        --out runs/onpolicy
    focusdpo compare --workers 1 --variants focusdpo-onpolicy,focusdpo,dpo-onpolicy,dpo --seeds 0,1,2 \\
        --out runs/onpolicy eval.n_scenes=64 'eval.seeds=[0,1]'
    python experiments/onpolicy.py runs/onpolicy

Prints markdown tables: every method against the base; the pairs ``focusdpo-onpolicy - focusdpo``,
``dpo-onpolicy - dpo``, ``dpo-onpolicy - focusdpo-onpolicy`` (mean over training seeds, 95 % paired bootstrap
interval over scenes x sampling seeds with the training seeds resampled too, detectable effect); the rounds
(candidates, kept, rejections, judge gap) and the refresh's share of the training wall time (round seconds over
round seconds plus the step times of ``metrics.csv``); the identity-confusion agreement (``eval/confusion.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from focusdpo.eval.stats import paired_summary
from focusdpo.eval.toy import unit_scores

METRICS = ("fidelity", "leakage", "prompt")
PAIRS = [("focusdpo-onpolicy", "focusdpo"), ("dpo-onpolicy", "dpo"), ("dpo-onpolicy", "focusdpo-onpolicy"),
         ("focusdpo-onpolicy", "base"), ("focusdpo", "base"), ("dpo-onpolicy", "base"), ("dpo", "base")]


def _ci(d: dict) -> str:
    bold = "**" if d["excludes_zero"] else ""
    return f"{bold}{d['mean']:+.3f}{bold} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def differences(metrics: dict, seeds: list[int], replicates: int = 2000) -> str:
    names = sorted({k.split("@")[0] for k in metrics if "@s" in k})
    pairs = [(a, b) for a, b in PAIRS if a in names and (b in names or b == "base")]
    rows = {p: {} for p in pairs}
    mde = {p: {} for p in pairs}
    for h in METRICS:
        scores = {"base": unit_scores(metrics["base"], h)[None]}
        scores.update({n: np.stack([unit_scores(metrics[f"{n}@s{s}"], h) for s in seeds]) for n in names})
        out = paired_summary(scores, pairs, replicates, 0)
        for a, b in pairs:
            rows[(a, b)][h] = out[a][f"vs_{b}"]
            mde[(a, b)][h] = out[a][f"vs_{b}"]["mde"]
    lines = ["| paired difference | Δ fidelity | Δ leakage | Δ prompt | detectable effect (fid. / leak.) |",
             "|---|---|---|---|---|"]
    for a, b in pairs:
        r = rows[(a, b)]
        lines.append(f"| {a} - {b} | {_ci(r['fidelity'])} | {_ci(r['leakage'])} | {_ci(r['prompt'])} | "
                     f"{mde[(a, b)]['fidelity']:.3f} / {mde[(a, b)]['leakage']:.3f} |")
    return "\n".join(lines)


def methods(metrics: dict, seeds: list[int]) -> str:
    names = ["base"] + sorted({k.split("@")[0] for k in metrics if "@s" in k})
    lines = ["| method | fidelity (↑) | leakage (↓) | prompt (↑) | units |", "|---|---|---|---|---|"]
    for n in names:
        keys = ["base"] if n == "base" else [f"{n}@s{s}" for s in seeds]
        cells = []
        for h in METRICS:
            per = [metrics[k][h]["mean"] for k in keys]
            spread = f" ± {np.std(per, ddof=1):.3f}" if len(per) > 1 else ""
            cells.append(f"{np.mean(per):.3f}{spread}")
        units = len(metrics[keys[0]]["units"]["keys"])
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {units} |")
    return "\n".join(lines)


def rounds(runs_dir: Path) -> str:
    lines = ["| run | rounds | candidates | kept | rejected (not worse) | judge gap, kept | refresh s | steps s | "
             "refresh share |", "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs_dir.iterdir()):
        log = run / "refresh.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        with open(run / "metrics.csv") as fh:
            steps = sum(float(r["time_data"]) + float(r["time_forward"]) + float(r["time_backward"])
                        + float(r["time_optim"]) for r in csv.DictReader(fh))
        refresh = sum(r["time_s"] for r in rows)
        cand, kept = sum(r["candidates"] for r in rows), sum(r["kept"] for r in rows)
        rejected = sum(sum(r["rejected"].values()) for r in rows)
        gaps = [r["gap_kept"] for r in rows if r["gap_kept"] is not None]
        lines.append(f"| {run.name} | {len(rows)} | {cand} | {kept} | {rejected} | {np.mean(gaps):.3f} | "
                     f"{refresh:.0f} | {steps:.0f} | {refresh / (refresh + steps):.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the compare --out folder")
    ap.add_argument("--seeds", default=None, help="training seeds (default: every seed evaluated in the folder)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    print("## Rounds\n\n" + rounds(args.folder / "runs") + "\n")
    metrics_path = args.folder / "eval" / "metrics.json"
    if not metrics_path.is_file():
        print(f"(no evaluation yet: {metrics_path})")
        return
    metrics = json.loads(metrics_path.read_text())
    if seeds is None:  # every "<method>@s<seed>" the evaluation holds
        seeds = sorted({int(k.rsplit("@s", 1)[1]) for k in metrics if "@s" in k})
    print("## Methods\n\n" + methods(metrics, seeds) + "\n")
    print("## Paired differences\n\n" + differences(metrics, seeds) + "\n")
    conf = args.folder / "eval" / "confusion.json"
    if conf.is_file():
        agreement = json.loads(conf.read_text())
        print("## Identity confusion\n")
        print("| method | confusion rate | own sim | leakage |\n|---|---|---|---|")
        for name, v in agreement["methods"].items():
            print(f"| {name} | {v['confusion']:.3f} | {v['own_sim']:.3f} | {v['leakage']:.3f} |")
        print("\nSpearman with leakage: " + json.dumps({k: agreement[k] for k in
                                                        ("over_methods", "over_scenes", "over_units")}))


if __name__ == "__main__":
    main()
