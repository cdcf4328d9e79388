"""Method comparison on the toy benchmark: every objective and ablation with the same data and training budget.

``compare(cfg, variants, seeds, out_dir)`` trains one run per (variant, training seed) from the same base, DIP
set and config, evaluates all of them and the base on the same held-out scenes and noise
(:func:`focusdpo.eval.toy.evaluate_toy`), and writes ``results.md`` and ``results.json``:

- per run: the toy metrics averaged over the evaluation's sampling seeds;
- per variant: mean and spread (std, ddof 1) of those run means over the *training* seeds, which is the
  spread that says whether a method beats another; the base has no training seed, its spread is over the
  sampling seeds;
- paired differences to ``base`` and to ``dpo`` per training seed (same scenes, same noise);
- for every method and difference a 95 % paired bootstrap interval that resamples the evaluation units and the
  training seeds jointly (:func:`add_intervals`), the detectable effect of every difference, sentences saying
  which differences exclude 0, and a warning (log and ``results.md``) when a difference of ``eval.target_effect``
  cannot be detected.

Runs already finished (``lora.safetensors`` present) are reused, so an interrupted comparison resumes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from focusdpo.config import Config
from focusdpo.eval.report import INTERVALS_NOTE, difference_lines, fmt, fmt_paired

# The evaluation `focusdpo compare` runs unless told otherwise: 192 scenes x 2 subject counts x 2 sampling seeds =
# 768 units per run. Measured on the shipped base (DPO runs vs base, 3 training seeds, 128 units): the per-unit
# SD of the paired difference is ~0.097 for leakage and fidelity, so ~730-750 units detect 0.01 (80 % power,
# alpha 0.05; prompt, a coarser score, needs ~2300). Two methods x 3 seeds + the base = 7 x 768 images.
EVAL_BUDGET = ("eval.n_scenes=192", "eval.seeds=[0,1]")

# name -> config overrides; every variant starts from the same config.
VARIANTS: dict[str, tuple[str, ...]] = {
    "sft": ("train.objective=sft",),
    "dpo": ("train.objective=dpo",),
    "patchdpo": ("train.objective=patchdpo",),
    "focusdpo": ("train.objective=focusdpo",),
    "focusdpo-no-spaf": ("train.objective=focusdpo", "focus.spaf=false"),
    "focusdpo-no-dpce": ("train.objective=focusdpo", "focus.dpce=false"),
    "focusdpo-no-gate": ("train.objective=focusdpo", "focus.dynamic=false"),
    # the first implementation's focus: hidden-state cosine of the middle double block, gate threshold 0.5
    "focusdpo-cosine": ("train.objective=focusdpo", "focus.readout=cosine", "focus.tap_layer=null", "focus.tau=0.5"),
    # on-policy DIP (issue 16): 4 refresh rounds in the 100-step budget, half of each batch from the newest round,
    # regenerated with the sampler's guidance (4 in configs/toy.yaml)
    "focusdpo-onpolicy": ("train.objective=focusdpo", "data.refresh_every=25", "data.refresh_guidance=4.0"),
    "dpo-onpolicy": ("train.objective=dpo", "data.refresh_every=25", "data.refresh_guidance=4.0"),
}
HEADLINE = ("fidelity", "leakage", "prompt")
LOWER_IS_BETTER = {"leakage"}


def resolve_variants(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Known variant names -> overrides; an unknown name raises ValueError listing the known ones. Every objective
    of the registry (:mod:`focusdpo.objectives`) is a variant under its own name."""
    from focusdpo.objectives import objective_names

    known = {**VARIANTS, **{n: (f"train.objective={n}",) for n in objective_names() if n not in VARIANTS}}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: allowed {', '.join(known)}")
    return {n: known[n] for n in names}


def train_runs(cfg: Config, variants: Mapping[str, Sequence[str]], seeds: Sequence[int], runs_dir: Path,
               log: Callable[[str], None] = print) -> dict[str, Path]:
    """Train (or reuse) one run per variant and seed; returns ``{"<variant>@s<seed>": run_dir}``."""
    from focusdpo.train import checkpoint as ckpt
    from focusdpo.train.trainer import train

    runs: dict[str, Path] = {}
    for name, overrides in variants.items():
        for seed in seeds:
            run_dir = runs_dir / f"{name}-s{seed}"
            if not (run_dir / "lora.safetensors").is_file():
                log(f"training {name} (seed {seed}) -> {run_dir}")
                run_cfg = cfg.with_overrides([*overrides, f"train.seed={seed}", f"train.output_dir={run_dir}"])
                resume = ckpt.latest_checkpoint(run_dir) is not None  # else: an earlier try left no checkpoint
                train(run_cfg, resume=resume, overwrite=not resume)
            runs[f"{name}@s{seed}"] = run_dir
    return runs


def _stat(values: Sequence[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _reference(metrics: Mapping[str, Mapping], ref: str, seed: int, headline: str) -> float:
    """The value a run of training seed ``seed`` is compared with: the base, or the dpo run of the same seed."""
    key = "base" if ref == "base" else f"{ref}@s{seed}"
    return metrics[key][headline]["mean"]


def summarise(metrics: Mapping[str, Mapping], variants: Sequence[str], seeds: Sequence[int],
              replicates: int = 2000, boot_seed: int = 0) -> dict:
    """Per-variant mean/spread over training seeds and paired differences to base and dpo (see module doc), with
    95 % paired bootstrap intervals (``replicates`` draws from ``boot_seed``) when every run has per-unit scores
    (:func:`add_intervals`)."""
    out: dict = {}
    if "base" in metrics:
        out["base"] = {h: {**_stat(metrics["base"][h]["per_seed"]), "over": "sampling seeds"} for h in HEADLINE}
    for name in variants:
        per_run = {s: metrics[f"{name}@s{s}"] for s in seeds}
        row: dict = {h: {**_stat([per_run[s][h]["mean"] for s in seeds]), "over": "training seeds",
                         "per_seed": [per_run[s][h]["mean"] for s in seeds]} for h in HEADLINE}
        refs = [r for r in ("base", "dpo") if r != name and (r in metrics if r == "base" else r in variants)]
        for ref in refs:
            row[f"vs_{ref}"] = {h: _stat([per_run[s][h]["mean"] - _reference(metrics, ref, s, h) for s in seeds])
                                for h in HEADLINE}
        out[name] = row
    if all("units" in v for v in metrics.values()):
        add_intervals(out, metrics, variants, seeds, replicates, boot_seed)
    return out


def add_intervals(summary: dict, metrics: Mapping[str, Mapping], variants: Sequence[str], seeds: Sequence[int],
                  replicates: int = 2000, boot_seed: int = 0) -> None:
    """Add the paired bootstrap intervals to ``summary`` (in place), from the runs' per-unit scores.

    Each replicate resamples the evaluation units and the training seeds jointly, the same draw for every
    method (:func:`focusdpo.eval.stats.paired_summary`). Every headline block gets ``ci`` and ``se_boot``; every
    ``vs_<ref>`` block also ``excludes_zero``, ``se_unit``, ``n_units`` and ``mde`` (its ``mean`` stays the mean
    over training seeds of the per-seed differences).
    """
    for h in HEADLINE:
        _, result = _paired(metrics, variants, seeds, h, replicates, boot_seed)
        for name, row in summary.items():
            row[h].update(ci=result[name]["ci"], se_boot=result[name]["se_boot"])
            for key, diff in row.items():
                if key.startswith("vs_") and key in result[name]:
                    diff[h].update({k: v for k, v in result[name][key].items() if k != "mean"})


def _paired(metrics: Mapping[str, Mapping], variants: Sequence[str], seeds: Sequence[int], metric: str,
            replicates: int, boot_seed: int) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Per-unit scores of ``metric`` (base ``[1, U]``, each variant ``[seeds, U]``) and their
    :func:`~focusdpo.eval.stats.paired_summary` against ``base`` and ``dpo``."""
    from focusdpo.eval.stats import paired_summary
    from focusdpo.eval.toy import unit_scores

    scores = {"base": unit_scores(metrics["base"], metric)[None]} if "base" in metrics else {}
    scores.update({n: np.stack([unit_scores(metrics[f"{n}@s{s}"], metric) for s in seeds]) for n in variants})
    pairs = [(n, r) for r in ("base", "dpo") if r in scores for n in variants if n != r]
    return scores, paired_summary(scores, pairs, replicates, boot_seed)


def leakage_split(metrics: Mapping[str, Mapping], variants: Sequence[str], seeds: Sequence[int],
                  replicates: int = 2000, boot_seed: int = 0) -> dict | None:
    """Chance leakage and transfer (leakage minus it: what the scene's subjects carried over; see
    :func:`focusdpo.world.metrics.chance_leakage`) of the base and every variant, with paired bootstrap intervals
    of the differences to ``base`` and ``dpo`` (units and training seeds resampled, as :func:`add_intervals`).

    Returns ``{method: {"leakage_chance": {mean, ci}, "transfer": {mean, ci}, "vs_base": {...}, "vs_dpo": {...}}}``
    (means over units and training seeds), or None when some run was scored before the split existed.
    """
    from focusdpo.eval.toy import CHANCE

    if not all("units" in v and all(h in v["units"] for h in CHANCE) for v in metrics.values()):
        return None
    out: dict = {}
    for h in CHANCE:
        scores, result = _paired(metrics, variants, seeds, h, replicates, boot_seed)
        for name, values in scores.items():
            row = out.setdefault(name, {})
            row[h] = {"mean": float(np.nanmean(values)), "ci": result[name]["ci"]}
            for ref in ("base", "dpo"):
                if f"vs_{ref}" in result[name]:
                    row.setdefault(f"vs_{ref}", {})[h] = result[name][f"vs_{ref}"]
    return out


def leakage_split_markdown(split: Mapping[str, Mapping] | None) -> str:
    """The results.md section of :func:`leakage_split` (empty for None)."""
    if not split:
        return ""
    lines = ["\n### Leakage split: chance and transfer\n\n",
             "Chance leakage: the same readings' leakage toward identities that are not in the scene; transfer = "
             "leakage - chance leakage, what the scene's subjects carried over (docs/results.md, \"Identity "
             "confusion\"). Means over units and training seeds [95 % interval].\n\n",
             "| method | chance leakage | transfer | Δ transfer vs base | Δ transfer vs dpo |\n|---|---|---|---|---|\n"]
    for name, row in split.items():
        diffs = " | ".join(fmt_paired(row.get(f"vs_{ref}", {}).get("transfer")) for ref in ("base", "dpo"))
        lines.append(f"| {name} | {row['leakage_chance']['mean']:.3f} | {fmt_paired(row['transfer'])} | {diffs} |\n")
    return "".join(lines)


def _fmt(stat: Mapping[str, float] | None, signed: bool = False) -> str:
    return fmt(stat, signed=signed)


def results_markdown(summary: Mapping[str, Mapping], command: str, seeds: Sequence[int], cfg: Config) -> str:
    """The results table (mean ± std) and paired differences, with the command that reproduces it."""
    head = "| method | fidelity (↑) | leakage (↓) | prompt (↑) |\n|---|---|---|---|\n"
    rows = "".join(f"| {n} | " + " | ".join(_fmt(v.get(h)) for h in HEADLINE) + " |\n" for n, v in summary.items())
    lines = [
        "## Toy benchmark: methods and ablations\n\n",
        f"Command: `{command}`\n\n",
        f"Training seeds {list(seeds)}; sampling seeds {cfg.eval.seeds}; {cfg.eval.n_scenes} held-out scenes per "
        f"subject count {cfg.eval.subject_counts}; {cfg.train.max_steps} steps x batch {cfg.data.batch_size} for "
        f"every method; {cfg.data.n_records} DIP records. Methods: mean ± std over training seeds (per run: "
        f"mean over scenes and sampling seeds); base: mean ± std over sampling seeds.\n\n",
        head, rows,
    ]
    for ref in ("base", "dpo"):
        diff_rows = [(n, v[f"vs_{ref}"]) for n, v in summary.items() if f"vs_{ref}" in v]
        if diff_rows:
            lines.append(f"\nPaired difference to `{ref}` (per training seed, same scenes and noise):\n\n"
                         "| method | Δ fidelity | Δ leakage | Δ prompt |\n|---|---|---|---|\n")
            lines += [f"| {n} | " + " | ".join(_fmt(d[h], signed=True) for h in HEADLINE) + " |\n"
                      for n, d in diff_rows]
    if any("ci" in v[h] for v in summary.values() for h in HEADLINE):
        lines.append(INTERVALS_NOTE.replace("\nIntervals", "\nIntervals in brackets"))
        said = difference_lines(summary, cfg.eval.target_effect)
        lines += ["\n### What the sample can see\n\n"] + [f"- {line}\n" for line in said]
    return "".join(lines)


def compare(cfg: Config, variants: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
            command: str = "", log: Callable[[str], None] = print, train_only: bool = False) -> dict:
    """Train every variant for every seed, evaluate the runs and the base, write results.md/json; return the summary.

    ``train_only``: stop after training (returns ``{}``); a later call with the same arguments evaluates.
    """
    from focusdpo.data import ensure_toy_dip
    from focusdpo.eval.toy import evaluate_toy

    chosen = resolve_variants(variants)
    if not seeds:
        raise ValueError("compare: seeds is empty; give at least one training seed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_toy_dip(cfg, progress=True)
    cfg = cfg.with_overrides([f"data.path={data}"])
    cfg.save(out / "config.yaml")
    runs = train_runs(cfg, chosen, seeds, out / "runs", log)
    if train_only:  # e.g. several processes train disjoint variants, then one call evaluates them all
        return {}
    metrics = evaluate_toy(cfg, {"base": None, **runs}, out / "eval", log=log, log_differences=False)
    summary = summarise(metrics, list(chosen), seeds, cfg.eval.bootstrap, cfg.eval.bootstrap_seed)
    for line in difference_lines(summary, cfg.eval.target_effect):
        if line.startswith("warning"):
            log(line)
    split = leakage_split(metrics, list(chosen), seeds, cfg.eval.bootstrap, cfg.eval.bootstrap_seed)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if split is not None:
        (out / "leakage_split.json").write_text(json.dumps(split, indent=2))
    (out / "results.md").write_text(results_markdown(summary, command, seeds, cfg) + leakage_split_markdown(split))
    return summary
