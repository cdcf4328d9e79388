"""The toy benchmark: held-out identities of the built-in world, 2- and 3-subject scenes, ground-truth metrics.

Design, so that differences between methods are *paired*:

- The scenes are fixed by the world and ``eval.n_scenes`` / ``eval.subject_counts`` only (``SCENE_SEED``), not
  by the sampling seeds: every method and every seed sees the same held-out scenes.
- The initial noise of a batch depends only on (sampling seed, subject count, sample index, batch index), so
  every method starts each scene from the same noise; ``eval.batch_size`` must therefore not change between
  evaluations that are compared.
- Every method is sampled with the evaluation config's ``cfg.sample`` (steps, guidance, time shift), not the
  run's, so the sampler is the same for all.
- Spread is the standard deviation over ``eval.seeds`` (ddof 1; 0 for a single seed) of the per-seed means
  (each mean over all scenes and ``eval.samples_per_prompt`` samples); the per-seed values are kept in
  ``metrics.json`` so that paired method-minus-base gaps can be computed (``report.md`` shows them).

``metrics.json``::

    {"<method>": {"fidelity": {"mean", "std", "per_seed"}, "leakage": {...}, "prompt": {...},
                  "details": {"leak_rate" | "count" | "classes" | "positions" | "fidelity/<attr>" | ...: {...}},
                  "by_subjects": {"2": {"fidelity", "leakage", "prompt", "details"}, "3": {...}},
                  "n_scenes", "subject_counts", "seeds", "samples_per_prompt", "sample_steps", "run", "seconds",
                  "units": {"keys": [[k, seed, sample, scene], ...], "fidelity": [...], "leakage": [...],
                            "prompt": [...]},
                  "vs_base": {"fidelity": {"mean", "ci", "se_boot", "excludes_zero", "se_unit", "n_units", "mde"},
                              ...}, "vs_dpo": {...}}}

Each headline block also holds ``ci`` ([lo, hi], the 95 % bootstrap interval over the units) and ``se_boot``.
``units`` are the per-unit scores (unit = subject count x sampling seed x sample x scene; None where a unit
has no value, e.g. leakage with no subject found), from which :mod:`focusdpo.eval.stats` recomputes intervals;
``vs_<ref>`` are the paired differences to ``base`` and ``dpo`` with their intervals and detectable effect
(:func:`add_intervals`). The interval pools the units: for leakage, whose per-unit values can be missing, its
centre can differ from the per-seed mean in the last digits.

``method`` is ``base`` for the base model and the run's objective for a run (see :mod:`focusdpo.eval.methods`).

Speed: sampling is ~98 % of an evaluation and compute-bound in the transformer (one forward at one thread:
matmuls ~55 %, attention ~17 %, GELU ~8 %); the guidance branch already shared the conditional forward.
:func:`sample_units` encodes prompts and references once per subject count, runs chunks of ``eval.chunk``
images across sampling seeds and samples, and folds a run's LoRA into the weights (a run then costs what the
base costs; separate adapter matmuls cost 2 % to 1.5x more, the more so the busier the machine);
``eval.workers`` processes of one thread each keep the cores busy without the intra-op thread
synchronisation that stalls on a loaded machine (docs/performance.md has the measurements). The per-batch path
(``score_method(..., legacy=True)``) is kept for the equality test and ``benchmarks/bench_eval.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from focusdpo.backbones import Backbone
from focusdpo.backbones.base import TextCond, Tokens
from focusdpo.backbones.diffusion import FLOW, Diffusion, diffusion_of
from focusdpo.config import Config
from focusdpo.eval.methods import load_method, resolve_methods
from focusdpo.eval.report import comparison_grid, difference_lines, fmt_paired, to_uint8, toy_markdown
from focusdpo.eval.stats import finite_or_none
from focusdpo.judges import confusion_scores
from focusdpo.lora import adapters_merged
from focusdpo.world import Scene, World
from focusdpo.world.embedding import subject_embedder
from focusdpo.world.metrics import aggregate, score_scene, slot_strips

SCENE_SEED = 20_250_901
HEADLINE = ("fidelity", "leakage", "prompt")
CONFUSION = ("confusion", "margin", "matched_sim", "own_sim")  # per-unit, beside the headline (identity_confusion)
CHANCE = ("leakage_chance", "transfer")  # per-unit: leakage toward identities not in the scene, and the excess

Scores = dict[int, dict[int, list[dict]]]  # subject count -> sampling seed -> score_scene results


def heldout_scenes(world: World, n_scenes: int, subject_counts: Sequence[int]) -> dict[int, list[Scene]]:
    """``n_scenes`` held-out scenes per subject count, the same for every method and seed."""
    return {k: [world.sample_scene(rng, "heldout", k) for _ in range(n_scenes)]
            for k in subject_counts for rng in [np.random.default_rng([SCENE_SEED, k])]}


def batch_seed(seed: int, k: int, sample: int, batch: int) -> int:
    """Noise seed of one sampling batch; independent of the method, so noise is shared across methods."""
    return int(np.random.SeedSequence([seed, k, sample, batch]).generate_state(1)[0])


def references_of(scenes: Sequence[Scene], device: torch.device | str | None = None) -> list[torch.Tensor]:
    """The scenes' references as K tensors ``float [B, 3, R, R]`` in [0, 1] (reference order)."""
    k = len(scenes[0].references)
    return [torch.from_numpy(np.stack([s.references[i] for s in scenes])).permute(0, 3, 1, 2).float().div(255)
            .to(device) for i in range(k)]


def sample_scenes(backbone: Backbone, scenes: Sequence[Scene], cfg: Config, seed: int, sample: int
                  ) -> list[np.ndarray]:
    """One image per scene (``uint8 [S, S, 3]``), in batches of ``eval.batch_size`` with shared-noise seeds."""
    from focusdpo.sampling import generate

    size = (cfg.world.scene_size, cfg.world.scene_size)
    k = len(scenes[0].identities)
    out: list[np.ndarray] = []
    for b, start in enumerate(range(0, len(scenes), cfg.eval.batch_size)):
        batch = scenes[start:start + cfg.eval.batch_size]
        refs = references_of(batch, backbone.device)
        images = generate(backbone, [s.prompt for s in batch], refs, size, cfg.sample,
                          seed=batch_seed(seed, k, sample, b))
        out.extend(to_uint8(images))
    return out


def unit_noise(scenes: Sequence[Scene], cfg: Config, pairs: Sequence[tuple[int, int]], grid: tuple[int, int],
               channels: int, device: torch.device | str | None = None, diffusion: Diffusion = FLOW) -> torch.Tensor:
    """The initial noise of every (sampling seed, sample) in ``pairs`` for ``scenes``, concatenated in that order:
    ``float [len(pairs) * n_scenes, N, C]``, exactly the per-batch tensors :func:`sample_scenes` draws (seeded by
    :func:`batch_seed` per ``eval.batch_size`` batch), so both paths start every scene from the same noise."""
    k, bs = len(scenes[0].identities), cfg.eval.batch_size
    return torch.cat([diffusion.initial_noise(len(scenes[start:start + bs]), grid, channels,
                                              batch_seed(seed, k, sample, b), device)
                      for seed, sample in pairs for b, start in enumerate(range(0, len(scenes), bs))])


@torch.no_grad()
def sample_units(backbone: Backbone, scenes: Sequence[Scene], cfg: Config) -> dict[tuple[int, int], list[np.ndarray]]:
    """Every (sampling seed, sample) image of ``scenes`` (one subject count): ``{(seed, sample): [uint8 [S, S, 3]]}``.

    The fast path of :func:`sample_scenes`: prompts, the empty prompt and references are encoded once for all
    seeds and samples, the noise of all of them (:func:`unit_noise`) is sampled in chunks of ``eval.chunk``
    images, and each chunk's guidance branch runs in the same forward with its doubled conditioning built once
    (``sampling.doubled_guidance_fn``). Images equal the per-batch path's up to float rounding.
    """
    from focusdpo.sampling import sample

    size = (cfg.world.scene_size, cfg.world.scene_size)
    grid, device, n = backbone.token_grid(size), backbone.device, len(scenes)
    pairs = [(seed, j) for seed in cfg.eval.seeds for j in range(cfg.eval.samples_per_prompt)]
    refs = [backbone.encode_images(r) for r in references_of(scenes, device)]
    text = backbone.encode_prompts([s.prompt for s in scenes])
    diffusion = diffusion_of(backbone)
    noise = unit_noise(scenes, cfg, pairs, grid, refs[0].tokens.shape[2], device, diffusion)
    scene_of = torch.arange(n, device=device).repeat(len(pairs))
    sigmas = diffusion.sampling_sigmas(cfg.sample.steps, grid[0] * grid[1], cfg.sample.time_shift)
    model_fn, conditioning = _chunk_conditioning(backbone, text, refs, cfg.sample.guidance)
    images: list[np.ndarray] = []
    for start in range(0, len(noise), cfg.eval.chunk):
        cond = conditioning(scene_of[start:start + cfg.eval.chunk])
        x = sample(model_fn, noise[start:start + cfg.eval.chunk], sigmas, {**cond, "grid": grid}, None, diffusion)
        images.extend(to_uint8(backbone.decode_tokens(x, grid)))
    return {pair: images[i * n:(i + 1) * n] for i, pair in enumerate(pairs)}


def _chunk_conditioning(backbone: Backbone, text: TextCond, refs: Sequence[Tokens], guidance: float
                        ) -> tuple[Callable, Callable[[torch.Tensor], dict]]:
    """The sampler's ``model_fn`` and a function from a chunk's scene indices ``long [b]`` to its ``text`` and
    ``refs``: the prompt rows then the empty-prompt rows (``[2b, ...]``) under guidance, the prompt rows without."""
    from focusdpo.sampling import backbone_model_fn, doubled_guidance_fn

    if guidance == 1.0:
        return backbone_model_fn(backbone, 1.0), lambda idx: {
            "text": TextCond(text.tokens[idx], text.pooled[idx]), "refs": [Tokens(r.tokens[idx], r.grid) for r in refs]}
    empty = backbone.encode_prompts([""])

    def conditioning(idx: torch.Tensor) -> dict:
        b = len(idx)
        return {"text": TextCond(torch.cat([text.tokens[idx], empty.tokens.expand(b, -1, -1)]),
                                 torch.cat([text.pooled[idx], empty.pooled.expand(b, -1)])),
                "refs": [Tokens(r.tokens[idx].repeat(2, 1, 1), r.grid) for r in refs]}
    return doubled_guidance_fn(backbone, guidance), conditioning


def _legacy_units(backbone: Backbone, scenes: Sequence[Scene], cfg: Config) -> dict[tuple[int, int], list[np.ndarray]]:
    """:func:`sample_units` through the per-batch path (:func:`sample_scenes`); kept for the equality test and
    ``benchmarks/bench_eval.py``."""
    return {(seed, j): sample_scenes(backbone, scenes, cfg, seed, j)
            for seed in cfg.eval.seeds for j in range(cfg.eval.samples_per_prompt)}


def score_method(backbone: Backbone, world: World, scenes: Mapping[int, list[Scene]], cfg: Config,
                 legacy: bool = False) -> tuple[Scores, dict[int, list[np.ndarray]]]:
    """Sample and score every scene for every seed and sample; also the first seed's sample-0 images (for grids).

    ``legacy``: sample batch by batch through :func:`sample_scenes` (the old, slower path; same scores).
    """
    scores: Scores = {}
    first: dict[int, list[np.ndarray]] = {}
    with contextlib.nullcontext() if legacy else adapters_merged(backbone.trainable()):
        for k, ks in scenes.items():
            units = (_legacy_units if legacy else sample_units)(backbone, ks, cfg)
            scores[k] = {seed: [] for seed in cfg.eval.seeds}
            for (seed, _), images in units.items():
                scores[k][seed] += score_images(images, ks, world)
            first[k] = units[(cfg.eval.seeds[0], 0)]
    return scores, first


def score_images(images: Sequence[np.ndarray], scenes: Sequence[Scene], world: World) -> list[dict]:
    """:func:`~focusdpo.world.metrics.score_scene` of each image against its scene, plus the identity-confusion
    metric (:func:`identity_confusion`: ``confusion``, ``margin``, ``matched_sim``, ``own_sim``)."""
    out = []
    for img, scene in zip(images, scenes, strict=True):
        result = score_scene(img, scene, world)
        result.update(identity_confusion(img, scene))
        out.append(result)
    return out


_TOY_EMBED = subject_embedder()


def slot_regions(positions: Sequence[str], side: int) -> np.ndarray:
    """bool ``[K, side, side]``: the column strip of each prompt position (the generator's prompt-ordered boxes)."""
    regions = np.zeros((len(positions), side, side), dtype=bool)
    for i, (x0, x1) in enumerate(slot_strips(list(positions), side)):
        regions[i, :, x0:x1] = True
    return regions


def identity_confusion(image: np.ndarray, scene: Scene) -> dict[str, float]:
    """The identity-confusion metric of one toy image (issue 16 point 3): each prompt slot's strip is cropped,
    embedded with :func:`~focusdpo.world.embedding.subject_embedder` (colour, silhouette, pattern and mark; no
    download) and assigned to the references by the Hungarian assignment; ``confusion`` 1 when it disagrees with
    the prompt's order, ``margin`` the mean over subjects of the best other reference's similarity minus the own
    one (:func:`~focusdpo.judges.confusion_margin`), ``matched_sim`` the mean similarity of the assigned pairs,
    ``own_sim`` each strip's similarity to its own reference."""
    img = np.asarray(image)
    row = confusion_scores([img], [slot_regions(scene.positions, img.shape[0])], [scene.references],
                           _TOY_EMBED)[0]
    return {"confusion": row["confused"], "margin": row["margin"], "matched_sim": row["matched_sim"],
            "own_sim": row["own_sim"]}


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=float)
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std, "per_seed": [float(x) for x in v]}


def _block(per_seed: Sequence[Mapping[str, float]]) -> dict:
    """Per-seed ``aggregate`` dicts -> headline stats at the top level, every other key under ``details``."""
    keys = [k for k in per_seed[0] if k != "n_scenes"]
    out: dict = {k: _stats([a[k] for a in per_seed]) for k in HEADLINE}
    out["details"] = {k: _stats([a[k] for a in per_seed]) for k in keys if k not in HEADLINE}
    return out


def summarise(scores: Scores, cfg: Config) -> dict:
    """The ``metrics.json`` entry of one method (module docstring), from its :func:`score_method` scores."""
    seeds = cfg.eval.seeds
    pooled = [aggregate([r for k in scores for r in scores[k][s]]) for s in seeds]
    out = _block(pooled)
    out["by_subjects"] = {str(k): _block([aggregate(scores[k][s]) for s in seeds]) for k in scores}
    out.update(n_scenes=cfg.eval.n_scenes, subject_counts=list(scores), seeds=list(seeds),
               samples_per_prompt=cfg.eval.samples_per_prompt, sample_steps=cfg.sample.steps)
    out["units"] = unit_table(scores, cfg.eval.samples_per_prompt)
    return out


def unit_table(scores: Scores, samples_per_prompt: int) -> dict:
    """The per-unit scores of one method, the input of the paired bootstrap (:mod:`focusdpo.eval.stats`).

    Returns ``{"keys": [[k, sampling seed, sample, scene index], ...], "fidelity": [...], "leakage": [...],
    "prompt": [...], "subjects": {"fidelity": [[per subject] ...], "leakage": [[...] ...]}}``, one entry per
    unit (subject count x sampling seed x sample x scene, in that nesting order; the same for every method of
    an evaluation), scores in [0, 1] and None where a unit has no value; ``subjects`` holds each unit's
    per-subject scores in reference order (for analyses by subject, e.g. ``experiments/mechanism.py``).
    """
    keys: list[list[int]] = []
    values: dict[str, list[float | None]] = {h: [] for h in HEADLINE + CONFUSION + CHANCE}
    subjects: dict[str, list[list[float | None]]] = {"fidelity": [], "leakage": []}
    for k, by_seed in scores.items():
        for seed, results in by_seed.items():
            n_scenes = len(results) // samples_per_prompt
            keys += [[int(k), int(seed), j // n_scenes, j % n_scenes] for j in range(len(results))]
            for h in HEADLINE + CONFUSION + CHANCE:
                values[h] += [finite_or_none(float(r[h])) if h in r else None for r in results]
            for m in subjects:
                subjects[m] += [[finite_or_none(float(sub[f"{m}_mean"])) for sub in r["subjects"]] for r in results]
    return {"keys": keys, **values, "subjects": subjects}


def unit_scores(entry: Mapping, metric: str) -> np.ndarray:
    """``float [U]`` per-unit scores of ``metric`` from a ``metrics.json`` method entry (NaN for None)."""
    if "units" not in entry:
        raise ValueError("this metrics.json entry has no per-unit scores (written before they were saved): "
                         "re-run the evaluation to get intervals")
    return np.array([np.nan if v is None else v for v in entry["units"][metric]], dtype=float)


def add_intervals(metrics: dict, cfg: Config, refs: Sequence[str] = ("base", "dpo")) -> list[tuple[str, str]]:
    """Add paired bootstrap intervals to ``metrics`` (in place) and return the pairs compared.

    Each method's headline block gets ``ci`` and ``se_boot`` (units resampled; one run has no training seed);
    each method other than a reference gets ``vs_<ref>: {metric: {mean, ci, se_boot, excludes_zero, se_unit,
    n_units, mde}}`` for every reference present (:func:`focusdpo.eval.stats.paired_summary`).
    """
    from focusdpo.eval.stats import paired_summary

    names = [m for m, v in metrics.items() if "units" in v]
    keys = {json.dumps(metrics[m]["units"]["keys"]) for m in names}
    if len(keys) > 1:
        raise ValueError(f"methods {names} were scored on different units: evaluate them with the same config")
    pairs = [(m, r) for r in refs if r in names for m in names if m not in refs or refs.index(m) > refs.index(r)]
    for h in HEADLINE:
        s = paired_summary({m: unit_scores(metrics[m], h) for m in names}, pairs, cfg.eval.bootstrap,
                           cfg.eval.bootstrap_seed)
        for m in names:
            metrics[m][h].update(ci=s[m]["ci"], se_boot=s[m]["se_boot"])
            for r in refs:
                if f"vs_{r}" in s[m]:
                    metrics[m].setdefault(f"vs_{r}", {})[h] = s[m][f"vs_{r}"]
    return pairs


def add_leakage_split(metrics: dict, cfg: Config, ref: str = "base") -> None:
    """Add ``leakage_split`` to every method with per-unit scores (in place): the means over its units of
    ``leakage_chance`` and ``transfer`` (:func:`focusdpo.world.metrics.chance_leakage`: leakage is chance +
    transfer), and, when ``ref`` is present, ``vs_<ref>`` with the paired bootstrap interval of each. Methods
    scored before the split existed are skipped."""
    from focusdpo.eval.stats import paired_summary

    names = [m for m, v in metrics.items() if "units" in v and "transfer" in v["units"]]
    if not names:
        return
    pairs = [(m, ref) for m in names if m != ref] if ref in names else []
    for h in CHANCE:
        s = paired_summary({m: unit_scores(metrics[m], h) for m in names}, pairs, cfg.eval.bootstrap,
                           cfg.eval.bootstrap_seed)
        for m in names:
            block = metrics[m].setdefault("leakage_split", {})
            block[h] = {"mean": float(np.nanmean(unit_scores(metrics[m], h))), "ci": s[m]["ci"]}
            if f"vs_{ref}" in s[m]:
                block.setdefault(f"vs_{ref}", {})[h] = s[m][f"vs_{ref}"]


def leakage_split_markdown(metrics: Mapping[str, Mapping], ref: str = "base") -> str:
    """The "chance and transfer" section of ``report.md`` (empty when no method has the split)."""
    rows = [(m, v["leakage_split"]) for m, v in metrics.items() if "leakage_split" in v]
    if not rows:
        return ""
    lines = ["", "## Leakage: chance and transfer", "",
             "Chance leakage: the same readings' leakage toward identities that are not in the scene (a wrong "
             "attribute matching another subject by chance); transfer = leakage - chance leakage, what the scene's "
             "subjects carried over (`focusdpo.world.metrics.chance_leakage`).", "",
             f"| method | chance leakage | transfer | Δ transfer vs {ref} |", "|---|---|---|---|"]
    for m, split in rows:
        lines.append(f"| {m} | {split['leakage_chance']['mean']:.3f} | {split['transfer']['mean']:+.3f} | "
                     f"{fmt_paired(split.get(f'vs_{ref}', {}).get('transfer'))} |")
    return "\n".join(lines) + "\n"


MethodResult = tuple[Scores, dict[int, list[np.ndarray]], float]  # scores, first images, seconds


def score_methods(cfg: Config, runs: Mapping[str, Path | None], device: torch.device | str | None = None
                  ) -> Iterator[tuple[str, MethodResult]]:
    """``(method, (scores, first images, seconds))`` for each method of ``runs``, in order.

    ``eval.workers`` 1: one method after the other in this process. More: every (method, subject count) is a
    task of a pool of that many processes with one torch thread each (processes share no thread pool, so two
    of them keep two cores busy where two threads of one process wait on each other); ``seconds`` is then the
    sum of the method's task times.
    """
    if cfg.eval.workers == 1:
        world = World(cfg.world)
        scenes = heldout_scenes(world, cfg.eval.n_scenes, cfg.eval.subject_counts)
        for method, run_dir in runs.items():
            t0 = time.perf_counter()
            scores, first = score_method(load_method(cfg, run_dir, device), world, scenes, cfg)
            yield method, (scores, first, time.perf_counter() - t0)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    text = cfg.to_yaml()
    dev = None if device is None else str(device)
    with ProcessPoolExecutor(cfg.eval.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {m: [pool.submit(_score_task, text, None if r is None else str(r), k, dev)
                       for k in cfg.eval.subject_counts] for m, r in runs.items()}
        for method, tasks in futures.items():
            parts = [f.result() for f in tasks]
            scores = {k: p[0] for k, p in zip(cfg.eval.subject_counts, parts, strict=True)}
            first = {k: p[1] for k, p in zip(cfg.eval.subject_counts, parts, strict=True)}
            yield method, (scores, first, sum(p[2] for p in parts))


def _score_task(cfg_yaml: str, run_dir: str | None, k: int, device: str | None
                ) -> tuple[dict[int, list[dict]], list[np.ndarray], float]:
    """One worker task of :func:`score_methods`: the scores and first images of one method and subject count."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cfg = Config.from_yaml(cfg_yaml)
    world = World(cfg.world)
    scenes = heldout_scenes(world, cfg.eval.n_scenes, [k])
    scores, first = score_method(load_method(cfg, run_dir, device), world, scenes, cfg)
    return scores[k], first[k], time.perf_counter() - t0


def ground_truth(world: World, scenes: Mapping[int, list[Scene]]) -> dict[str, float]:
    """The metrics of the ground-truth renders themselves: the ceiling a perfect generator reaches."""
    return aggregate([score_scene(s.image, s, world) for ks in scenes.values() for s in ks])


def evaluate_toy(cfg: Config, runs: Mapping[str, Path | None], out_dir: str | Path,
                 device: torch.device | str | None = None, log: Callable[[str], None] | None = None,
                 log_differences: bool = True) -> dict:
    """Evaluate each method (``None`` = the base model) on the same held-out scenes and noise.

    ``log`` gets one line per method and, with ``log_differences``, the paired differences in words with the
    power warnings (:func:`focusdpo.eval.report.difference_lines`).

    Writes ``out_dir/metrics.json``, ``report.md``, ``grid_<k>subjects.png`` (references | ground-truth render |
    one column per method, seed 0), ``metrics.png`` (method comparison) and ``curves_<method>.png`` for runs
    with a ``metrics.csv``.
    Returns the ``metrics.json`` dict.
    """
    if not runs:
        raise ValueError("evaluate_toy: runs is empty; give {'base': None} and/or {name: run folder}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = World(cfg.world)
    scenes = heldout_scenes(world, cfg.eval.n_scenes, cfg.eval.subject_counts)
    metrics: dict = {}
    grids: dict[str, dict[int, list[np.ndarray]]] = {}
    for method, (scores, grids[method], seconds) in score_methods(cfg, runs, device):
        metrics[method] = summarise(scores, cfg)
        metrics[method].update(run=None if runs[method] is None else str(runs[method]), seconds=seconds)
        if log:
            m = metrics[method]
            log(f"{method}: " + ", ".join(f"{h} {m[h]['mean']:.3f} ± {m[h]['std']:.3f}" for h in HEADLINE)
                + f" ({m['seconds']:.0f} s)")
    add_intervals(metrics, cfg)
    add_leakage_split(metrics, cfg)
    agreement = confusion_agreement(metrics)
    (out / "confusion.json").write_text(json.dumps(agreement, indent=2))
    if log:
        log(confusion_line(agreement))
    if log and log_differences:
        for line in difference_lines(metrics, cfg.eval.target_effect):
            log(line)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_toy_outputs(out, metrics, runs, scenes, grids, ground_truth(world, scenes), cfg.eval.grid_scenes,
                      agreement, cfg.eval.target_effect)
    return metrics


def write_toy_outputs(out: Path, metrics: Mapping[str, dict], runs: Mapping[str, Path | None],
                      scenes: Mapping[int, list[Scene]], grids: Mapping[str, Mapping[int, list[np.ndarray]]],
                      truth: Mapping[str, float], grid_scenes: int, agreement: Mapping,
                      target: float | None = None) -> None:
    """``report.md``, the PNG grids and the plots of :func:`evaluate_toy` (``agreement``: its
    :func:`confusion_agreement`)."""
    from focusdpo.eval.plots import plot_method_comparison, plot_training_curves

    truth_line = ", ".join(f"{h} {truth[h]:.3f}" for h in HEADLINE)
    (out / "report.md").write_text(toy_markdown(metrics, target=target) + "\nGround-truth renders (the metrics' "
                                   f"ceiling): {truth_line}.\n" + leakage_split_markdown(metrics)
                                   + confusion_markdown(agreement))
    plot_method_comparison(metrics, out / "metrics.png", names=HEADLINE, title="toy benchmark")
    for method, run_dir in runs.items():
        if run_dir is not None and (Path(run_dir) / "metrics.csv").is_file():
            plot_training_curves(Path(run_dir) / "metrics.csv", out / f"curves_{method}.png", title=method)
    if grid_scenes == 0:
        return
    for k, ks in scenes.items():
        n = min(grid_scenes, len(ks))
        renders = [s.image for s in ks[:n]]
        columns = {m: torch.from_numpy(np.stack(images[:n])).permute(0, 3, 1, 2).float().div(255)
                   for m, images in [("truth", renders)] + [(m, g[k]) for m, g in grids.items()]}
        comparison_grid(references_of(ks[:n]), columns, out / f"grid_{k}subjects.png")


def confusion_agreement(metrics: Mapping[str, Mapping]) -> dict:
    """How the identity-confusion metric agrees with the ground-truth leakage (issue 16 point 3).

    Per method: confusion rate, mean margin, matched and own similarity, leakage (over its units). Then Spearman
    rank correlations with leakage of the confusion rate (``confusion``), the margin (``margin``) and the own
    similarity's negative (``neg_own_sim``): ``over_methods`` (the methods' means), ``over_units`` (every
    method's units pooled) and ``over_scenes`` (per scene, mean over methods and samples). Methods without the
    per-unit confusion scores are skipped; a score a method lacks (``margin`` before it existed) is NaN.
    """
    from scipy.stats import spearmanr

    names = [m for m, v in metrics.items() if "units" in v and "confusion" in v["units"]]
    signals = {"confusion": 1.0, "margin": 1.0, "neg_own_sim": -1.0}
    source = {"confusion": "confusion", "margin": "margin", "neg_own_sim": "own_sim"}
    per: dict = {}
    pooled: dict[str, list[np.ndarray]] = {h: [] for h in (*signals, "leakage")}
    by_scene: dict[tuple, list[list[float]]] = {}
    for m in names:
        units = metrics[m]["units"]
        u = {h: unit_scores(metrics[m], h) if h in units else np.full(len(units["keys"]), np.nan)
             for h in ("confusion", "margin", "matched_sim", "own_sim", "leakage")}
        per[m] = {h: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for h, v in u.items()}
        sig = {h: sign * u[source[h]] for h, sign in signals.items()}
        for h in signals:
            pooled[h].append(sig[h])
        pooled["leakage"].append(u["leakage"])
        for i, key in enumerate(units["keys"]):
            by_scene.setdefault((key[0], key[3]), []).append([sig[h][i] for h in signals] + [u["leakage"][i]])

    def rho(a: Sequence[float], b: Sequence[float]) -> float | None:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
            return None
        return float(spearmanr(a[ok], b[ok]).statistic)

    out: dict = {"methods": per, "n_methods": len(names)}
    if not names:
        return out
    leak = [per[m]["leakage"] for m in names]
    out["over_methods"] = {h: rho([signals[h] * per[m][source[h]] for m in names], leak) for h in signals}
    units = {h: np.concatenate(v) for h, v in pooled.items()}
    out["over_units"] = {**{h: rho(units[h], units["leakage"]) for h in signals}, "n": int(units["leakage"].size)}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (no margin) stays NaN
        sc = np.array([np.nanmean(np.array(v, dtype=float), axis=0) for v in by_scene.values()])
    out["over_scenes"] = {**{h: rho(sc[:, i], sc[:, -1]) for i, h in enumerate(signals)}, "n": len(by_scene)}
    return out


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def confusion_line(agreement: Mapping) -> str:
    """One log line of :func:`confusion_agreement`."""
    if not agreement.get("n_methods"):
        return "identity confusion: no per-unit confusion scores"
    m, u, s = agreement["over_methods"], agreement["over_units"], agreement["over_scenes"]
    return (f"identity confusion vs leakage, Spearman (margin / rate): over methods {_r(m['margin'])} / "
            f"{_r(m['confusion'])}; over scenes {_r(s['margin'])} / {_r(s['confusion'])}; "
            f"over units {_r(u['margin'])} / {_r(u['confusion'])}")


def confusion_markdown(agreement: Mapping) -> str:
    """The identity-confusion section of ``report.md``."""
    if not agreement.get("n_methods"):
        return ""
    lines = ["", "## Identity confusion", "",
             "Each prompt slot's strip is cropped, embedded (`focusdpo.world.embedding.subject_embedder`: colour, "
             "silhouette, pattern, mark) and assigned to the references (Hungarian); confusion = the assignment "
             "disagrees with the prompt's order; margin = best other reference's similarity minus the own one, "
             "mean over subjects (higher = more like another subject).", "",
             "| method | confusion rate | margin | matched sim | own sim | leakage |", "|---|---|---|---|---|---|"]
    for name, v in agreement["methods"].items():
        lines.append(f"| {name} | {v['confusion']:.3f} | {v['margin']:+.3f} | {v['matched_sim']:.3f} | "
                     f"{v['own_sim']:.3f} | {v['leakage']:.3f} |")
    lines += ["", confusion_line(agreement) + ".", ""]
    return "\n".join(lines)


def run_toy_command(cfg: Config, run_dirs: Sequence[Path], base: bool, out_dir: Path,
                    device: str | None = None, log: Callable[[str], None] | None = None) -> str:
    """``focusdpo eval --benchmark toy``: resolve the methods, evaluate, return a closing line."""
    methods = resolve_methods(run_dirs, base)
    evaluate_toy(cfg, methods, out_dir, device=device, log=log)
    return f"wrote {Path(out_dir) / 'metrics.json'} and {Path(out_dir) / 'report.md'}"
