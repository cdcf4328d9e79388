"""How often does the real-image judge (``matching``) agree with the toy world's ground truth (``toy``)? (issue 16)

Candidates are made as an on-policy round makes them (``focusdpo.train.refresh``): the policy (the base, or a run's
LoRA with ``--run``) regenerates one subject region of training DIP records at each ``--strength``; the negative is
the regenerated pixels inside the region, the positive's elsewhere. Each candidate is judged by ``toy`` (the truth:
the target lost an attribute or shows another subject's) and by ``matching`` with the toy embedding
(``data.refresh_embedder=toy``) at several margins and with the colour histogram. Prints, per strength and
matching variant: the share kept by each judge, the agreement, precision (matching-kept that the truth keeps),
recall (truth-kept that matching keeps) and Cohen's kappa.

    OMP_NUM_THREADS=1 python experiments/judge_agreement.py --n 256 --strength 0.35 --strength 0.75
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    po = float(np.mean(a == b))
    pe = float(np.mean(a) * np.mean(b) + (1 - np.mean(a)) * (1 - np.mean(b)))
    return (po - pe) / (1 - pe) if pe < 1 else float("nan")


def main() -> None:
    import torch

    from focusdpo.config import load_config
    from focusdpo.data import ensure_toy_dip
    from focusdpo.data.dataset import DipDataset
    from focusdpo.data.regenerate import RegenerateSettings, regenerate_regions
    from focusdpo.judges import Candidate, colour_embedder, make_judge
    from focusdpo.lora import adapters_merged
    from focusdpo.runs import load_method
    from focusdpo.world import World
    from focusdpo.world.embedding import subject_embedder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="training records (one candidate each per strength)")
    ap.add_argument("--strength", type=float, action="append", help="regeneration noise level (repeatable)")
    ap.add_argument("--run", default=None, help="a run folder: its LoRA is the policy (default: the base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margins", default="0,0.02,0.05,0.1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(str(Path(args.run) / "config.yaml") if args.run else None, [])
    backbone = load_method(cfg, args.run, None)
    dataset = DipDataset(ensure_toy_dip(cfg))
    world = World(cfg.world)
    truth = make_judge("toy", world=world)
    margins = [float(m) for m in args.margins.split(",")]
    judges = {f"matching toy m={m:g}": make_judge("matching", embed=subject_embedder(), margin=m) for m in margins}
    judges.update({f"matching colour m={m:g}": make_judge("matching", embed=colour_embedder(), margin=m)
                   for m in (0.0, 0.05)})
    rng = np.random.default_rng(args.seed)
    chosen = sorted(int(i) for i in rng.choice(len(dataset), size=min(args.n, len(dataset)), replace=False))
    records = [dataset.record(i) for i in chosen]
    targets = [int(rng.integers(r.num_subjects)) for r in records]
    print("| strength | judge | kept (judge) | kept (truth) | agreement | precision | recall | kappa |")
    print("|---|---|---|---|---|---|---|---|")
    for strength in args.strength or [0.75]:
        t0 = time.perf_counter()
        settings = RegenerateSettings(strength, cfg.data.refresh_steps, cfg.data.refresh_guidance)
        negatives: list[np.ndarray] = [None] * len(records)  # type: ignore[list-item]
        groups: dict = {}
        for j, rec in enumerate(records):
            groups.setdefault((rec.num_subjects, rec.positive.shape, tuple(r.shape for r in rec.references)),
                              []).append(j)
        with adapters_merged(backbone.trainable()):
            for members in groups.values():
                for start in range(0, len(members), 16):
                    chunk = members[start:start + 16]
                    props = regenerate_regions(
                        backbone, [records[j].positive for j in chunk], [records[j].regions[targets[j]] for j in chunk],
                        [records[j].prompt for j in chunk], [records[j].references for j in chunk], settings,
                        [np.random.default_rng([args.seed, j]) for j in chunk])
                    for j, p in zip(chunk, props, strict=True):
                        negatives[j] = np.where(records[j].regions[targets[j]][..., None], p, records[j].positive)
        cands = [Candidate(r.positive, n, r.regions, r.prompt, r.references, r.source)
                 for r, n in zip(records, negatives, strict=True)]
        t = np.array([truth.judge(c, k).keep for c, k in zip(cands, targets, strict=True)])
        for name, judge in judges.items():
            m = np.array([judge.judge(c, k).keep for c, k in zip(cands, targets, strict=True)])
            prec = float(t[m].mean()) if m.any() else float("nan")
            rec = float(m[t].mean()) if t.any() else float("nan")
            print(f"| {strength:g} | {name} | {m.mean():.2f} | {t.mean():.2f} | {np.mean(m == t):.2f} | {prec:.2f} | "
                  f"{rec:.2f} | {_kappa(m, t):+.2f} |", flush=True)
        print(f"<!-- strength {strength:g}: {len(cands)} candidates, {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
