"""Toy-evaluation throughput: the old per-batch path and the new one side by side, on the same scenes and noise.

Each repetition evaluates the same methods -- the shipped base and a LoRA run (rank 8 on the attention
projections, as ``focusdpo compare`` trains; random adapter weights, which cost the same as trained ones) -- on
the same held-out scenes, sampling seeds and sampler settings (the toy config: 20 steps, guidance 4), once per
path, alternating old and new so that a change in the machine's load hits both alike:

- ``old``: ``score_method(..., legacy=True)`` in this process: ``generate`` per ``eval.batch_size`` batch,
  prompts and references encoded per batch, the LoRA as separate adapter matmuls; torch's threads as set by
  ``--threads`` (default: torch's default, i.e. ``OMP_NUM_THREADS``).
- ``new-1p``: ``score_methods`` with ``eval.workers=1`` in this process, same threads: encodings once, chunks of
  ``eval.chunk`` images across seeds and samples, LoRA merged.
- ``new``: ``score_methods`` with ``eval.workers=--workers`` processes of one thread each (the pool's start-up
  included, as in ``focusdpo eval``/``compare``).

Printed: seconds and images per second of each path per repetition, the median ratio of new to old images
per second, and whether the per-unit scores of the paths are equal.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_eval.py [--n-scenes 8] [--seeds 0] [--steps 20] [--reps 3]
                                                      [--workers 2] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from focusdpo.config import Config, load_config
from focusdpo.eval import toy
from focusdpo.eval.methods import load_method
from focusdpo.world import World


def lora_run(cfg: Config, root: Path) -> Path:
    """A finished run folder with a rank-8 LoRA of random weights (``B`` nonzero, so the adapters act)."""
    from focusdpo.lora import save_lora

    run = root / "dpo-bench"
    run.mkdir()
    cfg.with_overrides(["train.objective=dpo"]).save(run / "config.yaml")
    backbone = load_method(cfg, None)
    backbone.add_lora(cfg.lora)
    gen = torch.Generator().manual_seed(0)
    save_lora(run / "lora.safetensors", {k: torch.randn(v.shape, generator=gen) * 0.01
                                         for k, v in backbone.lora_state_dict().items()})
    return run


def run_old(cfg: Config, runs: dict[str, Path | None]) -> dict[str, dict]:
    """Per-method unit tables through the legacy path, in this process."""
    world = World(cfg.world)
    scenes = toy.heldout_scenes(world, cfg.eval.n_scenes, cfg.eval.subject_counts)
    out = {}
    for method, run_dir in runs.items():
        scores, _ = toy.score_method(load_method(cfg, run_dir), world, scenes, cfg, legacy=True)
        out[method] = toy.unit_table(scores, cfg.eval.samples_per_prompt)
    return out


def run_new(cfg: Config, runs: dict[str, Path | None]) -> dict[str, dict]:
    """Per-method unit tables through ``score_methods`` (workers as ``cfg.eval.workers``)."""
    return {m: toy.unit_table(scores, cfg.eval.samples_per_prompt)
            for m, (scores, _, _) in toy.score_methods(cfg, runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-scenes", type=int, default=8, help="Held-out scenes per subject count (2 and 3).")
    p.add_argument("--seeds", default="0", help="Comma-separated sampling seeds.")
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the toy config's, 20).")
    p.add_argument("--reps", type=int, default=3, help="Repetitions of each path (alternating).")
    p.add_argument("--workers", type=int, default=2, help="Worker processes of the new path.")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the in-process paths.")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"eval.n_scenes={args.n_scenes}", f"eval.seeds=[{args.seeds}]", "eval.grid_scenes=0"]
    cfg = load_config(None, overrides + ([f"sample.steps={args.steps}"] if args.steps else []))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"base": None, "dpo": lora_run(cfg, Path(tmp))}
        images = len(runs) * cfg.eval.n_scenes * len(cfg.eval.subject_counts) * len(cfg.eval.seeds)
        print(f"{images} images per repetition ({list(runs)}, {cfg.eval.n_scenes} scenes x "
              f"{cfg.eval.subject_counts} subjects x seeds {cfg.eval.seeds}), {cfg.sample.steps} steps, guidance "
              f"{cfg.sample.guidance}; torch threads {torch.get_num_threads()}, new workers {args.workers}")
        paths = {"old": (run_old, cfg), "new-1p": (run_new, cfg),
                 "new": (run_new, cfg.with_overrides([f"eval.workers={args.workers}"]))}
        times: dict[str, list[float]] = {name: [] for name in paths}
        tables: dict[str, dict] = {}
        for rep in range(args.reps):
            for name, (fn, c) in paths.items():
                t0 = time.perf_counter()
                tables[name] = fn(c, runs)
                times[name].append(time.perf_counter() - t0)
            print(f"rep {rep}: " + ", ".join(f"{n} {t[-1]:.1f} s ({images / t[-1]:.2f} img/s)"
                                             for n, t in times.items()), flush=True)
    print("| path | median s | images/s | x old |\n|---|---|---|---|")
    old = statistics.median(times["old"])
    for name, t in times.items():
        ratios = [o / x for o, x in zip(times["old"], t, strict=True)]
        print(f"| {name} | {statistics.median(t):.1f} | {images / statistics.median(t):.2f} | "
              f"{statistics.median(ratios):.2f} (median of per-rep ratios; old {old:.1f} s) |")
    same = all(tables[n] == tables["old"] for n in tables)
    print(f"per-unit scores equal across paths: {same}")


if __name__ == "__main__":
    main()
