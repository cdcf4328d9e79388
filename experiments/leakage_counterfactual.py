"""How much of the toy leakage do the other subjects *cause*? A counterfactual with the same layout and noise.

For every held-out evaluation scene and every subject i, a counterfactual scene keeps subject i (identity,
reference, position, size) and the background and replaces every other subject by a random held-out identity that
is not in the scene (its noun in the prompt, its reference). It is sampled with the same initial noise as the
original (the scene lists are sampled in the same order and batches as ``focusdpo eval``). Subject i's reading in
the counterfactual is then scored for leakage toward the *original* co-subjects, which are no longer there:
``absent`` leakage is what subject i shows of their values without them (chance plus systematic misreadings);
``caused`` = leakage - absent leakage is what their presence adds. Compare with ``leakage_chance`` / ``transfer``
(the decoy baseline of ``focusdpo.world.metrics.chance_leakage``, which needs no extra sampling).

    OMP_NUM_THREADS=1 python experiments/leakage_counterfactual.py --config runs/onpolicy-10x/config.yaml \\
        --out runs/counterfactual --run runs/long/runs/* [--shard 0/2]
    python experiments/leakage_counterfactual.py --config runs/onpolicy-10x/config.yaml --out runs/counterfactual \\
        --report

Per model ``<out>/<model>.npz``: per evaluation unit (the keys of ``focusdpo eval``) leakage, chance leakage and
absent leakage (means over subjects). ``--report`` prints means and paired bootstrap intervals against the base
(and between the groups of a run folder's seeds, ``<name>-s<seed>``) over units and training seeds.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

COUNTER_SEED = 20_261_130


def counterfactual(world, scene, keep: int, rng: np.random.Generator):
    """``scene`` with every subject but ``keep`` replaced by a random held-out identity not in the scene."""
    from focusdpo.world import prompts

    taken = {i.id for i in scene.identities}
    pool = [i for i in world.split_ids("heldout") if i not in taken]
    idents, refs, ref_masks = list(scene.identities), list(scene.references), list(scene.ref_masks)
    for j in range(len(idents)):
        if j == keep:
            continue
        new = world.identities[int(rng.choice(pool))]
        pool.remove(new.id)
        idents[j] = new
        refs[j], ref_masks[j] = world.render_reference(new, rng)
    image, masks = world.render_scene(idents, scene.placements, scene.background)
    prompt = prompts.compose_prompt([i.noun for i in idents], scene.positions, scene.background)
    return replace(scene, prompt=prompt, identities=idents, references=refs, ref_masks=ref_masks, image=image,
                   masks=masks)


def leakage_toward(image: np.ndarray, scene, world, i: int, others) -> float:
    """Subject ``i``'s leakage (mean over scored attributes) toward identities ``others``, read from ``image``
    of ``scene``'s layout; NaN when no attribute is scored."""
    from focusdpo.world.metrics import SIZES, label_pixels, read_subject, slot_strips, subject_leakage

    side = image.shape[0]
    unit = world.scene_unit * side / world.cfg.scene_size
    k = len(scene.identities)
    labels = label_pixels(image, scene.background)
    min_area = max(4, round(0.2 * (SIZES[k][0] * side) ** 2))
    strip = slot_strips(scene.positions, side)[i]
    reading = read_subject(image, labels, strip, scene.identities[i].cls, unit, min_area)
    values = [v for v in subject_leakage(scene.identities[i], others, reading).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _sample(args: argparse.Namespace) -> None:
    import torch

    from focusdpo.config import Config
    from focusdpo.eval.toy import heldout_scenes, sample_units
    from focusdpo.lora import adapters_merged, load_lora
    from focusdpo.plugins import load_plugins
    from focusdpo.runs import load_method
    from focusdpo.world import World
    from focusdpo.world.metrics import score_scene

    torch.set_num_threads(1)
    load_plugins()
    cfg = Config.from_yaml(Path(args.config).read_text())
    world = World(cfg.world)
    scenes = heldout_scenes(world, cfg.eval.n_scenes, cfg.eval.subject_counts)
    counter = {k: [[counterfactual(world, s, i, np.random.default_rng([COUNTER_SEED, k, j, i]))
                    for j, s in enumerate(ks)] for i in range(k)] for k, ks in scenes.items()}
    models: list[tuple[str, str | None]] = [("base", None)]
    for r in args.run or []:
        p = Path(r)
        checkpoint = p.parent.name == "checkpoints"
        name = f"{p.parent.parent.name}{'@' if checkpoint else '/'}{p.name}"
        models.append((name, r))
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for m, (name, run) in enumerate(models):
        path = out / (name.replace("/", "__") + ".npz")
        if m % n_shards != shard or path.exists():
            continue
        t0 = time.perf_counter()
        if run and Path(run).parent.name == "checkpoints":
            backbone = load_method(cfg, Path(run).parent.parent, None, allow_checkpoint=True)
            backbone.load_lora_state_dict(load_lora(Path(run) / "lora.safetensors"))
        else:
            backbone = load_method(cfg, Path(run) if run else None, None)
        keys, leak, chance, absent = [], [], [], []
        with adapters_merged(backbone.trainable()):
            for k, ks in scenes.items():
                real = sample_units(backbone, ks, cfg)
                cf = [sample_units(backbone, counter[k][i], cfg) for i in range(k)]
                for (seed, sample), images in real.items():
                    for j, (img, scene) in enumerate(zip(images, ks, strict=True)):
                        truth = score_scene(img, scene, world)
                        per = [leakage_toward(cf[i][(seed, sample)][j], counter[k][i][j], world, i,
                                              [o for q, o in enumerate(scene.identities) if q != i])
                               for i in range(k)]
                        keys.append((k, seed, sample, j))
                        leak.append(truth["leakage"])
                        chance.append(truth["leakage_chance"])
                        absent.append(np.nanmean(per) if np.isfinite(per).any() else np.nan)
        np.savez(path, keys=np.array(keys), leakage=np.array(leak, dtype=float),
                 chance=np.array(chance, dtype=float), absent=np.array(absent, dtype=float), name=name)
        print(f"{name}: {len(keys)} units, {time.perf_counter() - t0:.0f} s", flush=True)


def _report(args: argparse.Namespace) -> None:
    from focusdpo.eval.stats import paired_summary

    data = {str(z["name"]): z for z in (np.load(f) for f in sorted(Path(args.out).glob("*.npz")))}
    groups: dict[str, list[str]] = {}
    for m in data:
        groups.setdefault(re.sub(r"-s\d+$", "", m), []).append(m)
    series = {"leakage": lambda z: z["leakage"], "chance": lambda z: z["chance"], "absent": lambda z: z["absent"],
              "transfer": lambda z: z["leakage"] - z["chance"], "caused": lambda z: z["leakage"] - z["absent"]}
    print("| model | units | leakage | chance leakage | absent leakage | transfer (- chance) | caused (- absent) |")
    print("|---|---|---|---|---|---|---|")
    for g, ms in groups.items():
        cells = [f"{np.nanmean([np.nanmean(fn(data[m])) for m in ms]):+.4f}" for fn in series.values()]
        print(f"| {g} ({len(ms)} seed{'s' if len(ms) > 1 else ''}) | {len(data[ms[0]]['keys'])} | " + " | ".join(cells)
              + " |")
    pairs = [(g, "base") for g in groups if g != "base"]
    pairs += [(a, b) for a, b in (("long/focusdpo", "long/dpo"),) if a in groups and b in groups]
    print("\n| paired difference | Δ leakage | Δ transfer | Δ caused |\n|---|---|---|---|")
    rows: dict = {p: {} for p in pairs}
    for h in ("leakage", "transfer", "caused"):
        scores = {g: np.stack([series[h](data[m]) for m in ms]) for g, ms in groups.items()}
        out = paired_summary(scores, pairs, args.replicates, 0)
        for a, b in pairs:
            d = out[a][f"vs_{b}"]
            bold = "**" if d["excludes_zero"] else ""
            rows[(a, b)][h] = f"{bold}{d['mean']:+.4f}{bold} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
    for (a, b), c in rows.items():
        print(f"| {a} - {b} | {c['leakage']} | {c['transfer']} | {c['caused']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--run", nargs="*", action="extend")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--replicates", type=int, default=2000)
    args = ap.parse_args()
    (_report if args.report else _sample)(args)


if __name__ == "__main__":
    main()
