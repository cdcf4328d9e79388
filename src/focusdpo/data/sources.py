"""Where positives come from, and the build entry points the CLI, trainer and demo call.

- Toy: ``World.sample_scene(rng, "train", k)``, ``k`` uniform in ``[world.min_subjects, world.max_subjects]``;
  only train identities are used, including the replacement drawn by ``identity_swap`` (another train identity
  of the same class, re-rendered at the same placement on the same background).
- Manifest: the JSONL manifest of :mod:`focusdpo.data.manifest`; bad lines become rejections.

``build_toy_dip(cfg, out_dir, n, seed)``, ``build_manifest_dip(cfg, manifest, out_dir)`` and
``ensure_toy_dip(cfg)`` (build once into ``data.cache_dir/toy-<hash of the settings>``, reuse after) return the
set's folder.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from focusdpo.data.builder import (
    BuildSettings,
    BuildSummary,
    Candidate,
    Rejection,
    atomic_build,
    cache_key,
    run_build,
    staged_build,
)
from focusdpo.data.disruptions import DisruptionContext, check_mix
from focusdpo.data.manifest import BadRecord, check_encoding, load_entry, manifest_root, read_manifest


def _settings(cfg, seed: int, patch: int | None, progress: bool, extras: dict[str, Any] | None,
              command: str | None, call: str) -> BuildSettings:
    """Build settings from ``cfg``; ``command`` None records the Python call and the process's command line."""
    patch = cfg.model.patch if patch is None else patch  # `--patch 0` is an error, not the default
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"--patch {patch} is invalid: allowed an integer >= 1 (pixels per token side of M_d; "
                         f"default model.patch={cfg.model.patch})")
    check_mix(cfg.data.disruptions)  # an unregistered plug-in fails here, before the output folder is touched
    if command is None:
        command = f"{call}(seed={seed}, patch={patch}) in `{shlex.join(sys.argv)}`"
    return BuildSettings(mix=dict(cfg.data.disruptions), seed=seed, patch=patch, sigma=cfg.focus.sigma,
                         bins=cfg.focus.bins, shard_records=cfg.data.shard_records, extras=dict(extras or {}),
                         progress=progress, command=command)


def plugin_extras(cfg, toy: bool) -> dict[str, Any]:
    """``extras`` the plug-in disruptions of ``data.disruptions`` need (``regenerate``: the base backbone,
    loaded once per build, and the world when ``toy``); empty when the mix has no plug-in."""
    if cfg.data.disruptions.get("regenerate", 0) <= 0:
        return {}
    from focusdpo.data.regenerate import regenerate_extras  # importing it registers the disruption

    return regenerate_extras(cfg, toy=toy)


def _identity_swapper(world, scene, by_class: dict[str, list[int]]):
    """``swap_identity`` hook for a toy scene: another train identity of the target's class, same placement."""
    used = {ident.id for ident in scene.identities}

    def swap(target: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        old = scene.identities[target]
        pool = [i for i in by_class.get(old.cls, []) if i not in used]
        if not pool:
            return scene.image.copy(), {"new_identity": None}
        new = world.identities[int(pool[int(rng.integers(len(pool)))])]
        idents = list(scene.identities)
        idents[target] = new
        image, _ = world.render_scene(idents, scene.placements, scene.background)
        return image, {"new_identity": new.id}
    return swap


def toy_candidates(world, n: int, seed: int, extras: dict[str, Any]) -> Iterator[Candidate]:
    """``n`` toy positives; record ``i`` is drawn by ``numpy.random.default_rng([seed, i])``."""
    lo, hi = world.cfg.min_subjects, world.cfg.max_subjects
    by_class: dict[str, list[int]] = {}
    for i in world.train_ids:
        by_class.setdefault(world.identities[i].cls, []).append(i)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        k = int(rng.integers(lo, hi + 1))
        scene = world.sample_scene(rng, "train", k)
        ctx = DisruptionContext(scene.references, scene.ref_masks, scene.prompt,
                                swap_identity=_identity_swapper(world, scene, by_class), extras=extras)
        source = {"builder": "toy", "seed": seed, "index": i, "split": "train",
                  "identities": [ident.id for ident in scene.identities], "positions": scene.positions,
                  "background": scene.background}
        yield Candidate(f"toy-{seed}-{i:06d}", scene.prompt, scene.image, scene.masks, scene.references,
                        scene.ref_masks, ctx, rng, source)


def build_toy_dip(cfg, out_dir: str | Path, n: int | None = None, seed: int | None = None, patch: int | None = None,
                  overwrite: bool = False, progress: bool = False, extras: dict[str, Any] | None = None,
                  command: str | None = None) -> BuildSummary:
    """Build a toy DIP set of ``n`` records (None: ``data.n_records``) into ``out_dir``; returns the summary.

    ``seed`` None: ``data.seed``; ``patch`` None: ``model.patch``; ``extras`` go to plug-in disruptions;
    ``command`` is recorded in the card (None: the Python call).
    """
    from focusdpo.world import World

    n = cfg.data.n_records if n is None else n
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    seed = cfg.data.seed if seed is None else seed
    s = _settings(cfg, seed, patch, progress, extras, command, f"build_toy_dip(n={n}")
    if cfg.world.scene_size % s.patch:
        raise ValueError(f"patch={s.patch} does not divide world.scene_size={cfg.world.scene_size}; "
                         "pick a patch that divides the scene size")
    world = World(cfg.world)
    return staged_build(out_dir, overwrite, lambda out: run_build(
        toy_candidates(world, n, seed, s.extras), out, s, n, {"kind": "toy", "world": asdict(cfg.world),
                                                              "split": "train"}))


def ensure_toy_dip(cfg, patch: int | None = None, progress: bool = False) -> Path:
    """The toy DIP set described by ``cfg`` (world, data, DPCE settings, patch), built once and cached.

    Returns ``data.path`` when set; else ``data.cache_dir/toy-<key>``, built atomically on first use.
    """
    if cfg.data.path is not None:
        path = Path(cfg.data.path).expanduser()
        if not (path / "card.json").exists():
            raise FileNotFoundError(f"data.path={cfg.data.path!r} has no card.json; build it with "
                                    "`focusdpo dip build` or set data.path=null to use the toy set")
        return path
    patch = cfg.model.patch if patch is None else patch
    final = Path(cfg.data.cache_dir).expanduser() / f"toy-{cache_key(cfg, patch)}"
    if (final / "card.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    return atomic_build(final, lambda tmp: build_toy_dip(cfg, tmp, patch=patch, progress=progress))


def manifest_candidates(path: Path, seed: int, patch: int, max_pixels: int, auto_masks: Any,
                        extras: dict[str, Any], root: Path | None = None, size: int | None = None,
                        ref_size: int | None = None) -> Iterator[Candidate | Rejection]:
    """Candidates of a manifest's good lines and :class:`Rejection` for the bad ones.

    ``auto_masks``: False, True (GrabCut) or an :class:`~focusdpo.data.automask.AutoMasker`.
    """
    root = manifest_root(path, root)
    for line, raw, entry in read_manifest(path, root):
        if isinstance(entry, BadRecord):
            yield Rejection({"line": line, "id": raw.get("id") if isinstance(raw, dict) else None}, raw, str(entry))
            continue
        try:
            got = load_entry(entry, root, patch, max_pixels, auto_masks, size, ref_size)
        except BadRecord as e:
            yield Rejection({"line": line, "id": entry.id}, raw, str(e))
            continue
        except Exception as e:  # noqa: BLE001 - whatever one line's files raise rejects that line only
            yield Rejection({"line": line, "id": entry.id}, raw, f"line {line} cannot be loaded "
                                                                 f"({type(e).__name__}: {e}); fix its files")
            continue
        ctx = DisruptionContext(got.references, got.ref_masks, entry.prompt, extras=extras)
        yield Candidate(entry.id, entry.prompt, got.image, got.regions, got.references, got.ref_masks, ctx,
                        np.random.default_rng([seed, line]), {**got.provenance, "seed": seed})


def build_manifest_dip(cfg, manifest: str | Path, out_dir: str | Path, seed: int | None = None,
                       patch: int | None = None, auto_masks: bool = False, overwrite: bool = False,
                       progress: bool = False, extras: dict[str, Any] | None = None,
                       command: str | None = None, root: str | Path | None = None, size: int | None = None,
                       ref_size: int | None = None, log: Callable[[str], None] | None = None) -> BuildSummary:
    """Build a DIP set from a JSONL manifest into ``out_dir``; bad lines go to ``rejected.jsonl``.

    ``root``: the folder the manifest's paths are relative to (None: the manifest's folder).
    ``auto_masks``: masks for records without them, by ``data.mask_backend`` (:mod:`focusdpo.data.automask`);
    ``log`` (default: stderr) gets the line saying which mask backend is used and why.
    ``size`` / ``ref_size``: resize targets / references to squares of that side (shorter side, centre crop),
    so that every record falls in one loader bucket; None keeps the photos' sizes (targets are only cropped to
    multiples of the patch).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist; give a JSONL file (one record per line)")
    base = manifest_root(manifest, root)
    seed = cfg.data.seed if seed is None else seed
    s = _settings(cfg, seed, patch, progress, extras, command, f"build_manifest_dip({str(manifest)!r}")
    for name, v in (("size", size), ("ref_size", ref_size)):
        if v is not None and (v < s.patch or v % s.patch):
            raise ValueError(f"{name}={v} must be a positive multiple of the patch {s.patch}")
    masker = None
    if auto_masks:
        from focusdpo.data.automask import make_masker

        # before the output folder is touched, not mid-build: loads the models, or checks OpenCV for GrabCut
        masker = make_masker(cfg.data, log or (lambda m: print(m, file=sys.stderr)))
    check_encoding(manifest)
    with manifest.open("rb") as f:
        total = sum(1 for t in f if t.strip())
    items = manifest_candidates(manifest, seed, s.patch, cfg.data.max_pixels, masker or False, s.extras, base, size,
                                ref_size)
    return staged_build(out_dir, overwrite, lambda out: run_build(
        items, out, s, total, {"kind": "manifest", "manifest": str(manifest.resolve()), "root": str(base),
                               "auto_masks": masker.info if masker else False, "size": size, "ref_size": ref_size,
                               "max_pixels": cfg.data.max_pixels}))
