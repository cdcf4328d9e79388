"""Does the identity-confusion metric agree with the toy world's ground-truth leakage? (issue 16 point 3)

Two steps, so that embedders can be compared without sampling again:

    # 1. sample every model's evaluation units once (same scenes and noise as `focusdpo eval`) into an image cache
    OMP_NUM_THREADS=1 python experiments/confusion_agreement.py sample --config runs/onpolicy-10x/config.yaml \\
        --out runs/confusion --run runs/onpolicy-10x/runs/* --run runs/long/runs/* \\
        --sampler steps=4 --sampler steps=8 --sampler guidance=1 --sampler guidance=8
    # 2. score the cached images with the ground-truth metrics and the confusion metric under each embedder
    python experiments/confusion_agreement.py score --out runs/confusion

Step 1 writes ``<out>/images/<model>.npz`` (``images`` uint8 ``[U, S, S, 3]``, ``keys`` ``[U, 4]`` =
subject count, sampling seed, sample, scene). Models: the base, every ``--run`` folder (its LoRA folded in) and the
base under each ``--sampler`` override of ``sample.*`` (other samplers give the same network other outputs, and
so a spread of leakage that trained models within one budget do not have). ``--shard i/n`` samples every n-th
model only (two processes of one thread keep two cores busy). A ``--run`` of the form ``<run>/checkpoints/step-N``
is that checkpoint's LoRA (``experiments/leak_objective.py`` makes a run whose checkpoints leak more and more).

Step 2 prints and writes ``<out>/agreement.json`` / ``agreement.md``: per embedder, Spearman rank correlations
between the confusion metric (the image's confusion 0/1, its *confusion margin* = mean over subjects of the
best other reference's similarity minus the own one, and ``-own_sim``) and the ground-truth leakage, over models
(means), over scenes (means over models and samples) and over units, with 95 % bootstrap intervals that resample
scenes; and the same on *planted* renders: each held-out scene re-rendered with ``j`` of one subject's
attributes copied from another subject (``j`` = 0..4), whose true leakage is known by construction.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _sample(args: argparse.Namespace) -> None:
    import torch

    from focusdpo.config import Config
    from focusdpo.eval.toy import heldout_scenes, sample_units
    from focusdpo.lora import adapters_merged, load_lora
    from focusdpo.plugins import load_plugins
    from focusdpo.runs import load_method
    from focusdpo.world import World

    torch.set_num_threads(1)
    load_plugins()  # FOCUSDPO_PLUGINS: a run trained with a plug-in objective (experiments/leak_objective.py)
    cfg = Config.from_yaml(Path(args.config).read_text())
    models: list[tuple[str, str | None, dict]] = [("base", None, {})]
    for r in args.run or []:
        p = Path(r)
        if p.parent.name == "checkpoints":  # one checkpoint of a run: <run>/checkpoints/step-N
            models.append((f"{p.parent.parent.name}@{p.name}", str(p), {}))
        else:
            models.append((f"{p.parent.parent.name}/{p.name}", str(p), {}))
    for s in args.sampler or []:
        key, value = s.split("=", 1)
        models.append((f"base@{key}={value}", None, {key: float(value)}))
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    out = Path(args.out) / "images"
    out.mkdir(parents=True, exist_ok=True)
    world = World(cfg.world)
    scenes = heldout_scenes(world, cfg.eval.n_scenes, cfg.eval.subject_counts)
    for i, (name, run, sampler) in enumerate(models):
        path = out / (name.replace("/", "__") + ".npz")
        if i % n_shards != shard or path.exists():
            continue
        t0 = time.perf_counter()
        mcfg = Config.from_yaml(cfg.to_yaml())
        for key, value in sampler.items():
            setattr(mcfg.sample, key, type(getattr(mcfg.sample, key))(value))
        if run and Path(run).parent.name == "checkpoints":
            backbone = load_method(mcfg, Path(run).parent.parent, None, allow_checkpoint=True)
            backbone.load_lora_state_dict(load_lora(Path(run) / "lora.safetensors"))
        else:
            backbone = load_method(mcfg, Path(run) if run else None, None)
        images, keys = [], []
        with adapters_merged(backbone.trainable()):
            for k, ks in scenes.items():
                for (seed, sample), imgs in sample_units(backbone, ks, mcfg).items():
                    images += imgs
                    keys += [(k, seed, sample, j) for j in range(len(imgs))]
        np.savez_compressed(path, images=np.stack(images), keys=np.array(keys), name=name)
        print(f"{name}: {len(images)} images, {time.perf_counter() - t0:.0f} s", flush=True)


EMBEDDERS = ("colour", "subject")


def _embedders() -> dict:
    from focusdpo.judges import colour_embedder
    from focusdpo.world.embedding import subject_embedder

    return {"colour": colour_embedder(), "subject": subject_embedder()}


def per_subject(image: np.ndarray, scene, world, embeds: dict) -> dict:
    """Ground truth (score_scene) and, per embedder, the assignment's per-subject numbers for one image."""
    from focusdpo.eval.toy import slot_regions
    from focusdpo.judges import assign_image
    from focusdpo.world.metrics import score_scene

    truth = score_scene(image, scene, world)
    row = {"leakage": truth["leakage"], "fidelity": truth["fidelity"], "transfer": truth["transfer"],
           "leakage_chance": truth["leakage_chance"],
           "subject_leakage": [s["leakage_mean"] for s in truth["subjects"]],
           "subject_transfer": [s["transfer"] for s in truth["subjects"]]}
    regions = slot_regions(scene.positions, image.shape[0])
    for name, embed in embeds.items():
        a = assign_image(image, regions, scene.references, embed)
        row[name] = {"confused": float(a["confused"]), "margin": a["margin"].tolist(), "own": a["own"].tolist()}
    return row


def _spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok]).statistic)


def agreement(rows: dict[str, list[dict]], keys: np.ndarray, embed: str, replicates: int, seed: int = 0,
              target: str = "leakage") -> dict:
    """Spearman between the confusion metric under ``embed`` and ``target`` (``leakage`` or ``transfer``), over
    models / scenes / units / subjects, with 95 % bootstrap intervals resampling scenes (a scene = subject
    count x scene index)."""
    models = list(rows)
    scene_id = keys[:, 0] * 10_000 + keys[:, 3]
    scenes = np.unique(scene_id)
    # [model, unit] arrays
    leak = np.array([[r[target] for r in rows[m]] for m in models], dtype=float)
    conf = np.array([[r[embed]["confused"] for r in rows[m]] for m in models])
    marg = np.array([[np.mean(r[embed]["margin"]) for r in rows[m]] for m in models])
    own = np.array([[np.mean(r[embed]["own"]) for r in rows[m]] for m in models])
    s_leak = [np.array(r[f"subject_{target}"], dtype=float) for m in models for r in rows[m]]
    s_marg = [np.array(r[embed]["margin"]) for m in models for r in rows[m]]
    sub_leak, sub_marg = np.concatenate(s_leak), np.concatenate(s_marg)
    sub_unit = np.repeat(np.tile(scene_id, len(models)), [len(x) for x in s_leak])

    def stats(sel_units: np.ndarray, sel_subjects: np.ndarray) -> dict:
        lk, cf, mg, ow = leak[:, sel_units], conf[:, sel_units], marg[:, sel_units], own[:, sel_units]
        mean = lambda x: np.nanmean(x, axis=1)  # noqa: E731
        sc = {}
        sid = scene_id[sel_units]
        for s in np.unique(sid):
            c = sid == s
            sc[s] = [np.nanmean(lk[:, c]), np.nanmean(cf[:, c]), np.nanmean(mg[:, c]), np.nanmean(-ow[:, c])]
        sc = np.array(list(sc.values()))
        same = np.array([not m.startswith("base@") for m in models])  # the evaluation's own sampler
        return {
            "models": {"confusion": _spearman(mean(cf), mean(lk)), "margin": _spearman(mean(mg), mean(lk)),
                       "neg_own": _spearman(-mean(ow), mean(lk))},
            "models_same_sampler": {"confusion": _spearman(mean(cf)[same], mean(lk)[same]),
                                    "margin": _spearman(mean(mg)[same], mean(lk)[same]),
                                    "neg_own": _spearman(-mean(ow)[same], mean(lk)[same])},
            "scenes": {"confusion": _spearman(sc[:, 1], sc[:, 0]), "margin": _spearman(sc[:, 2], sc[:, 0]),
                       "neg_own": _spearman(sc[:, 3], sc[:, 0])},
            "units": {"confusion": _spearman(cf.ravel(), lk.ravel()), "margin": _spearman(mg.ravel(), lk.ravel()),
                      "neg_own": _spearman(-ow.ravel(), lk.ravel())},
            "subjects": {"margin": _spearman(sub_marg[sel_subjects], sub_leak[sel_subjects])}}

    # split-half reliability over scenes: scene means (over models) from sampling seed A vs seed B; the
    # correlation any scene-level signal can reach with the target is bounded by the two reliabilities
    seeds = np.unique(keys[:, 1])
    reliability: dict = {}
    if seeds.size >= 2:
        halves = [keys[:, 1] == seeds[0], keys[:, 1] == seeds[1]]
        for name, arr in ((target, leak), ("margin", marg), ("confusion", conf)):
            means = []
            for h in halves:
                means.append([np.nanmean(arr[:, h & (scene_id == sc)]) for sc in scenes])
            reliability[name] = _spearman(means[0], means[1])
            # and per unit: the same model and scene under the two seeds
            a = np.concatenate([arr[i, halves[0]] for i in range(len(models))])
            b = np.concatenate([arr[i, halves[1]] for i in range(len(models))])
            reliability[f"{name}_units"] = _spearman(a, b)
    point = stats(np.arange(keys.shape[0]), np.arange(sub_leak.size))
    rng = np.random.default_rng(seed)
    reps: list[dict] = []
    for _ in range(replicates):
        draw = rng.choice(scenes, size=scenes.size, replace=True)
        counts = {s: c for s, c in zip(*np.unique(draw, return_counts=True), strict=True)}
        units = np.concatenate([np.repeat(np.flatnonzero(scene_id == s), c) for s, c in counts.items()])
        subj = np.concatenate([np.repeat(np.flatnonzero(sub_unit == s), c) for s, c in counts.items()])
        reps.append(stats(units, subj))
    out: dict = {}
    for level, vals in point.items():
        out[level] = {}
        for metric, v in vals.items():
            boot = np.array([r[level][metric] for r in reps if r[level][metric] is not None])
            ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot.size else None
            out[level][metric] = {"rho": v, "ci": ci}
    out["split_half"] = reliability
    out["n"] = {"models": len(models), "same_sampler": sum(not m.startswith("base@") for m in models),
                "scenes": int(scenes.size), "units": int(keys.shape[0]) * len(models),
                "subjects": int(np.isfinite(sub_leak).sum())}
    out["per_model"] = {m: {target: float(np.nanmean(leak[i])), "confusion": float(conf[i].mean()),
                            "margin": float(marg[i].mean()), "own": float(own[i].mean())}
                        for i, m in enumerate(models)}
    return out


def planted(world, split: str, n_scenes: int, seed: int, embeds: dict, generator=None, strength: float = 0.5
            ) -> dict:
    """Scenes of ``split`` re-rendered with j = 0..4 of one subject's leakage attributes copied from another:
    per embedder, Spearman of the unit margin and confusion with the true leakage, and per j the means.

    ``generator`` (a backbone): each planted render is first taken back to noise level ``strength`` and
    denoised by it (SDEdit of the whole image, ``regenerate_regions``, guidance 4, 10 steps), so that the
    images look generated while carrying the planted leak; the truth is then read from the output."""
    from focusdpo.world.embedding import plant_leak

    rng = np.random.default_rng(seed)
    items: list[tuple] = []
    for k in (2, 3):
        for _ in range(n_scenes):
            scene = world.sample_scene(rng, split, k)
            target, donor = (int(x) for x in rng.choice(k, size=2, replace=False))
            order = [str(a) for a in rng.permutation(["class", "body", "pattern", "detail"])]
            for j in range(5):
                items.append((plant_leak(world, scene, target, donor, order[:j]), j))
    images = [leaked.image for leaked, _ in items]
    if generator is not None:
        from focusdpo.data.regenerate import RegenerateSettings, regenerate_regions

        settings = RegenerateSettings(strength=strength, steps=10, guidance=4.0)
        out: list[np.ndarray] = []
        for k in (2, 3):  # one batch shape per subject count (the references' count)
            idx = [i for i, (leaked, _) in enumerate(items) if len(leaked.identities) == k]
            for start in range(0, len(idx), 32):
                chunk = idx[start:start + 32]
                done = regenerate_regions(
                    generator, [images[i] for i in chunk], [np.ones(images[i].shape[:2], bool) for i in chunk],
                    [items[i][0].prompt for i in chunk], [items[i][0].references for i in chunk], settings,
                    [np.random.default_rng([seed, i]) for i in chunk])
                out += list(zip(chunk, done, strict=True))
        images = [img for _, img in sorted(out, key=lambda t: t[0])]
    rows: list[dict] = []
    for (leaked, j), image in zip(items, images, strict=True):
        row = per_subject(np.asarray(image), leaked, world, embeds)
        row["j"] = j
        rows.append(row)
    out: dict = {}
    leak = np.array([r["leakage"] for r in rows], dtype=float)
    js = np.array([r["j"] for r in rows])
    for name in embeds:
        marg = np.array([np.mean(r[name]["margin"]) for r in rows])
        conf = np.array([r[name]["confused"] for r in rows])
        out[name] = {"units": {"margin": _spearman(marg, leak), "confusion": _spearman(conf, leak)},
                     "by_j": {str(j): {"leakage": float(np.nanmean(leak[js == j])),
                                       "margin": float(marg[js == j].mean()),
                                       "confusion": float(conf[js == j].mean())} for j in range(5)},
                     "levels": {"margin": _spearman([marg[js == j].mean() for j in range(5)],
                                                    [np.nanmean(leak[js == j]) for j in range(5)])}}
    out["n"] = len(rows)
    return out


def transfer_differences(rows: dict[str, list[dict]], replicates: int) -> str:
    """Markdown: leakage, its chance part and transfer of every trained method (runs ``<folder>/<name>-s<seed>``
    grouped over seeds) against the base and of the planned pairs, paired bootstrap over units and seeds."""
    import re

    from focusdpo.eval.stats import paired_summary

    groups: dict[str, list[str]] = {}
    for m in rows:
        g = re.sub(r"-s\d+$", "", m) if "/" in m else m
        groups.setdefault(g, []).append(m)
    pairs = [(g, "base") for g in groups if g != "base"]
    pairs += [(a, b) for a, b in (("long/focusdpo", "long/dpo"),
                                  ("onpolicy-10x/focusdpo-onpolicy", "onpolicy-10x/focusdpo"),
                                  ("onpolicy-10x/dpo-onpolicy", "onpolicy-10x/focusdpo-onpolicy"))
              if a in groups and b in groups]
    cells: dict[tuple[str, str], dict[str, str]] = {p: {} for p in pairs}
    for h in ("leakage", "leakage_chance", "transfer"):
        scores = {g: np.stack([[np.nan if r[h] is None else r[h] for r in rows[m]] for m in ms]).astype(float)
                  for g, ms in groups.items()}
        out = paired_summary(scores, pairs, replicates, 0)
        for a, b in pairs:
            d = out[a][f"vs_{b}"]
            bold = "**" if d["excludes_zero"] else ""
            cells[(a, b)][h] = f"{bold}{d['mean']:+.4f}{bold} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
    lines = ["| paired difference | Δ leakage | Δ chance leakage | Δ transfer |", "|---|---|---|---|"]
    lines += [f"| {a} - {b} | {c['leakage']} | {c['leakage_chance']} | {c['transfer']} |"
              for (a, b), c in cells.items()]
    return "\n".join(lines)


def _rho(v: dict) -> str:
    if v["rho"] is None:
        return "n/a"
    ci = f" [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]" if v.get("ci") else ""
    return f"{v['rho']:+.2f}{ci}"


def markdown(result: dict) -> str:
    """The tables of ``agreement.json``."""
    out = []
    for part, target in (("generated", "leakage"), ("generated_transfer", "transfer")):
        out += [f"\n### Spearman with {target} on generated images (95 % interval resampling scenes)\n",
                "| embedder | signal | over models | over models, one sampler | over scenes | over units | "
                "over subjects |", "|---|---|---|---|---|---|---|"]
        for e, r in result[part].items():
            for sig in ("confusion", "margin", "neg_own"):
                subj = _rho(r["subjects"]["margin"]) if sig == "margin" else ""
                out.append(f"| {e} | {sig} | {_rho(r['models'][sig])} | {_rho(r['models_same_sampler'][sig])} | "
                           f"{_rho(r['scenes'][sig])} | {_rho(r['units'][sig])} | {subj} |")
        n = next(iter(result[part].values()))["n"]
        out.append(f"\n{n['models']} models ({n['same_sampler']} with the evaluation's sampler: all but `base@...`), "
                   f"{n['scenes']} scenes, {n['units']} units, {n['subjects']} subjects.")
        rel = "; ".join(f"{e}: " + ", ".join(f"{k} {v:+.2f}" for k, v in r["split_half"].items() if v is not None)
                        for e, r in result[part].items())
        out.append(f"\nSplit-half reliability (Spearman between sampling seeds, scene means over models / units): "
                   f"{rel}.")
    g, t = result["generated"], result["generated_transfer"]
    emb = list(g)
    out += ["\n### Per model\n",
            "| model | leakage | transfer | " + " | ".join(f"{e} confusion | {e} margin | {e} own" for e in emb) + " |",
            "|---|---|---|" + "---|---|---|" * len(emb)]
    for m in g[emb[0]]["per_model"]:
        cells = " | ".join(f"{g[e]['per_model'][m]['confusion']:.3f} | {g[e]['per_model'][m]['margin']:+.3f} | "
                           f"{g[e]['per_model'][m]['own']:.3f}" for e in emb)
        out.append(f"| {m} | {g[emb[0]]['per_model'][m]['leakage']:.4f} | "
                   f"{t[emb[0]]['per_model'][m]['transfer']:+.4f} | {cells} |")
    for part in ("planted", "planted_generated"):
        if part not in result:
            continue
        p = result[part]
        how = (f"passed through the base (SDEdit from noise level {p['strength']})" if part == "planted_generated"
               else "as rendered")
        out += [f"\n### Planted leaks, {how} ({p['n']} held-out scenes x j = 0..4 of one subject's attributes "
                "copied from another)\n",
                "| embedder | Spearman(margin, leakage) over units | Spearman(confusion, leakage) | "
                + " | ".join(f"margin / confusion at j={j}" for j in range(5)) + " |",
                "|---|---|---|" + "---|" * 5]
        for e in emb:
            r = p[e]
            js = " | ".join(f"{r['by_j'][str(j)]['margin']:+.3f} / {r['by_j'][str(j)]['confusion']:.3f}"
                            for j in range(5))
            out.append(f"| {e} | {r['units']['margin']:+.2f} | {r['units']['confusion']:+.2f} | {js} |")
        truth = ", ".join(f"{p[emb[0]]['by_j'][str(j)]['leakage']:.3f}" for j in range(5))
        out.append(f"\nTrue leakage (read from the images) by j: {truth}.")
    return "\n".join(out) + "\n"


def _score(args: argparse.Namespace) -> None:
    from focusdpo.config import Config
    from focusdpo.eval.toy import heldout_scenes
    from focusdpo.world import World

    out = Path(args.out)
    cfg = Config.from_yaml(Path(args.config).read_text()) if args.config else Config()
    world = World(cfg.world)
    embeds = _embedders()
    files = sorted((out / "images").glob("*.npz"))
    scenes = heldout_scenes(world, cfg.eval.n_scenes, cfg.eval.subject_counts)
    rows: dict[str, list[dict]] = {}
    keys = None
    t0 = time.perf_counter()
    for f in files:
        z = np.load(f)
        name = str(z["name"])
        if keys is None:
            keys = z["keys"]
        elif not np.array_equal(keys, z["keys"]):
            raise SystemExit(f"{f}: its units differ from the first model's")
        rows[name] = [per_subject(img, scenes[int(k)][int(j)], world, embeds)
                      for img, (k, _, _, j) in zip(z["images"], z["keys"], strict=True)]
        print(f"scored {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"generated": {e: agreement(rows, keys, e, args.replicates) for e in embeds},
              "generated_transfer": {e: agreement(rows, keys, e, args.replicates, target="transfer") for e in embeds},
              "planted": planted(world, "heldout", args.planted, 1, embeds)}
    if args.through > 0:
        import torch

        from focusdpo.runs import load_method

        torch.set_num_threads(1)
        t1 = time.perf_counter()
        base = load_method(cfg, None, None)
        result["planted_generated"] = planted(world, "heldout", args.planted, 1, embeds, base, args.through)
        result["planted_generated"]["strength"] = args.through
        print(f"planted through the base at strength {args.through}: {time.perf_counter() - t1:.0f} s", flush=True)
    (out / "agreement.json").write_text(json.dumps(result, indent=2))
    (out / "agreement.md").write_text(markdown(result))
    print(markdown(result))
    diffs = transfer_differences(rows, args.replicates)
    (out / "transfer.md").write_text(diffs + "\n")
    print(diffs)


def _calibrate(args: argparse.Namespace) -> None:
    """Block weights of :func:`focusdpo.world.embedding.subject_embedder` chosen on planted renders of
    *training-split* scenes: the weights (colour fixed at 1) whose unit margin ranks the true leakage best."""
    import itertools

    from focusdpo.config import Config
    from focusdpo.eval.toy import slot_regions
    from focusdpo.judges import bbox_crop, confusion_margin
    from focusdpo.world import World
    from focusdpo.world.embedding import BLOCKS, plant_leak, subject_features
    from focusdpo.world.metrics import score_scene

    world = World(Config().world)
    rng = np.random.default_rng(args.seed)
    sims, leaks = [], []  # per unit: {block: [K, K]}, leakage
    for k in (2, 3):
        for _ in range(args.scenes):
            scene = world.sample_scene(rng, "train", k)
            target, donor = (int(x) for x in rng.choice(k, size=2, replace=False))
            order = [str(a) for a in rng.permutation(["class", "body", "pattern", "detail"])]
            refs = [subject_features(r) for r in scene.references]
            for j in range(5):
                leaked = plant_leak(world, scene, target, donor, order[:j])
                crops = [subject_features(bbox_crop(leaked.image, r))
                         for r in slot_regions(scene.positions, leaked.image.shape[0])]
                sims.append({b: np.array([[c[b] @ r[b] for r in refs] for c in crops]) for b in BLOCKS})
                leaks.append(score_scene(leaked.image, leaked, world)["leakage"])
    leaks = np.array(leaks, dtype=float)
    grid = [0.25, 0.5, 1.0, 2.0, 4.0]
    results = []
    for ws in itertools.product(grid, repeat=len(BLOCKS) - 1):
        w = dict(zip(BLOCKS, (1.0, *ws), strict=True))
        marg = []
        for s in sims:
            sim = sum(w[b] * s[b] for b in BLOCKS) / sum(w.values())
            marg.append(float(np.mean(confusion_margin(sim))))
        results.append((_spearman(marg, leaks), w))
    results.sort(key=lambda r: -r[0])
    print(f"{len(leaks)} planted training-split units; best weights by Spearman(unit margin, leakage):")
    for rho, w in results[:5]:
        print(f"  {rho:+.3f}  {w}")
    equal = next(r for r in results if all(v == 1.0 for v in r[1].values()))
    print(f"  equal weights: {equal[0]:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--config", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--run", nargs="*", action="extend")
    s.add_argument("--sampler", action="append")
    s.add_argument("--shard", default="0/1")
    c = sub.add_parser("score")
    c.add_argument("--out", required=True)
    c.add_argument("--config", default=None)
    c.add_argument("--replicates", type=int, default=1000)
    c.add_argument("--planted", type=int, default=64, help="planted scenes per subject count")
    c.add_argument("--through", type=float, default=0.5,
                   help="also pass the planted renders through the base from this noise level (0: skip)")
    b = sub.add_parser("calibrate")
    b.add_argument("--scenes", type=int, default=64, help="training-split scenes per subject count")
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"sample": _sample, "score": _score, "calibrate": _calibrate}[args.cmd](args)


if __name__ == "__main__":
    main()
