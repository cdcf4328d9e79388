"""The DIP builder: positives (toy world scenes or manifest photos) -> disruption -> M_d -> Parquet shards.

``build_toy_dip`` and ``build_manifest_dip`` write ``out_dir/data-*.parquet``, ``card.json`` and
``rejected.jsonl`` (one JSON line per record that could not be used: its line or index, id, the record and
the reason). A bad record never stops a build, whatever exception it raises: it is listed and the others are
written.

Staging (issue 15 point 1): a build is written into a hidden sibling ``.<out>.building-<pid>`` and swapped in
for ``out_dir`` only when it finishes (:func:`staged_build`), so ``--overwrite`` never loses the previous set to
a build that fails. A build stopped by an exception (a full disk, Ctrl-C, a failing plug-in) writes what it had
accepted into valid shards with a card marked ``"complete": false`` and leaves them in the staging folder,
which :class:`BuildStopped` names; the previous set stays as it was. (``kill -9`` can cost the records of the
open shard: Parquet needs its footer.)

Determinism: record ``i`` of a toy build depends only on ``(seed, i)`` and the world (its own
``numpy.random.Generator`` seeded with ``[seed, i]`` draws K, the scene, the disruption and its parameters);
a manifest record depends only on ``(seed, line)``. The shards are therefore identical across runs.

Per record: the disruption is drawn from the mix renormalised over the disruptions that apply (two-subject
disruptions need K >= 2, ``identity_swap`` needs the world); a draw that leaves every pixel of ``M_prior``
unchanged (e.g. shuffling a flat region) is redrawn, up to ``MAX_TRIES`` times, then the record is rejected.
``M_d = complexity_map(positive, patch, focus.sigma, focus.bins)`` is computed on the unmasked positive, in
batches of records of one size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from focusdpo.data.disruptions import (
    DisruptionContext,
    DisruptionError,
    apply_disruption,
    check_mix,
    draw_disruption,
    get_disruption,
)
from focusdpo.data.parquet import SHARD_PATTERN, ShardWriter
from focusdpo.data.records import DipRecord

MAX_TRIES = 4
FORMAT = "focusdpo-dip/1"
# Bumped whenever the same settings would build different records (disruption parameters, sampling): it is
# part of the toy cache key, so a stale cached set is never reused after such a change.
BUILD_VERSION = 2
MD_BATCH = 64


@dataclass
class Candidate:
    """A positive and its subjects, before disruption.

    Attributes:
        id, prompt: the record's id and prompt.
        image: uint8 ``[H, W, 3]``; regions: bool ``[K, H, W]``.
        references: K uint8 ``[h_k, w_k, 3]``; ref_masks: K bool ``[h_k, w_k]``.
        ctx: what the disruptions may use; rng: the record's generator; source: provenance.
    """

    id: str
    prompt: str
    image: np.ndarray
    regions: np.ndarray
    references: list[np.ndarray]
    ref_masks: list[np.ndarray]
    ctx: DisruptionContext
    rng: np.random.Generator
    source: dict[str, Any]


@dataclass
class Rejection:
    """A record that cannot be used: where it came from (``where``: line or index), its raw form, the reason."""

    where: dict[str, Any]
    record: Any
    reason: str


@dataclass
class BuildSummary:
    """What a build wrote: counts, timing and the paths.

    ``never_drawn``: disruptions of the mix that no written record drew, with what they need (e.g.
    ``identity_swap`` in a manifest build, which has no world to draw another instance from).
    """

    out_dir: Path
    written: int = 0
    rejected: int = 0
    seconds: float = 0.0
    disruptions: dict[str, int] = field(default_factory=dict)
    subjects: dict[int, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    never_drawn: dict[str, str] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        """Written records per second of wall time."""
        return self.written / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BuildSettings:
    """Settings shared by both builders.

    Attributes:
        mix: disruption name -> weight (``DataConfig.disruptions``).
        seed: build seed.
        patch: pixels per token side of ``M_d``.
        sigma, bins: DPCE parameters (``FocusConfig``).
        shard_records: records per Parquet shard.
        extras: plug-in capabilities given to every disruption context (e.g. ``{"backbone": ...}``).
        progress: show a progress bar on stderr.
        command: the command line recorded in the card.
    """

    mix: dict[str, float]
    seed: int = 0
    patch: int = 2
    sigma: float = 1.0
    bins: int = 32
    shard_records: int = 1000
    extras: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    command: str = ""


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse to mix with an existing build unless ``overwrite`` (then its files go)."""
    out = Path(out_dir).expanduser()
    old = sorted(out.glob(SHARD_PATTERN)) + [p for p in (out / "card.json", out / "rejected.jsonl") if p.exists()]
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds a DIP build ({old[0].name}); pass --overwrite or another --out")
    for p in old:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def disrupt(cand: Candidate, mix: dict[str, float]) -> tuple[str, Any]:
    """Draw and apply a disruption that changes ``M_prior``; returns ``(name, DisruptionResult)``.

    Raises :class:`DisruptionError` when no applicable draw changes a pixel in ``MAX_TRIES`` tries.
    """
    tried = []
    for _ in range(MAX_TRIES):
        name = draw_disruption(mix, cand.regions.shape[0], cand.ctx, cand.rng)
        res = apply_disruption(name, cand.image, cand.regions, cand.rng, cand.ctx)
        if res.changed > 0:
            return name, res
        tried.append(name)
    raise DisruptionError(f"no drawn disruption changed the subject region (tried {tried}); "
                          "the subject may be flat or tiny: check its mask")


def compute_m_d(images: list[np.ndarray], patch: int, sigma: float, bins: int) -> list[np.ndarray]:
    """DPCE maps of uint8 ``[H, W, 3]`` images (grouped by size): float32 ``[H / patch, W / patch]`` in [0, 1]."""
    from focusdpo.focus import complexity_map

    out: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.shape, []).append(i)
    for idx in by_size.values():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            maps = complexity_map(x, patch, sigma=sigma, bins=bins).clamp_(0.0, 1.0).numpy().astype(np.float32)
        for j, i in enumerate(idx):
            out[i] = maps[j]
    return out  # type: ignore[return-value]


class BuildStopped(RuntimeError):
    """A build stopped before its end (I/O error of the output, interrupt); the message says where the records
    accepted so far are kept and that the previous set is untouched."""


OUTPUT_FILES = ("card.json", "rejected.jsonl")


def _old_build(out: Path) -> list[Path]:
    return sorted(out.glob(SHARD_PATTERN)) + [out / n for n in OUTPUT_FILES if (out / n).exists()]


def staged_build(out_dir: str | Path, overwrite: bool, build: Callable[[Path], BuildSummary]) -> BuildSummary:
    """Run ``build(staging folder)`` and swap the result in for ``out_dir`` only once it finished.

    Refuses (:class:`FileExistsError`) an ``out_dir`` that is a file or holds a build, unless ``overwrite``; the
    old build stays until the new one is complete (and is kept when the new one wrote no record). Other files in
    ``out_dir`` are kept. On failure the staging folder keeps what was written and :class:`BuildStopped` names
    it (a ``ValueError`` or ``FileNotFoundError`` raised before any record, i.e. bad settings, passes through
    and the staging folder is removed).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder (it is created when missing)")
    old = _old_build(out) if out.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds a DIP build ({old[0].name}); pass --overwrite or another --out")
    stage = out.with_name(f".{out.name}.building-{os.getpid()}")
    try:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    except OSError as e:
        raise BuildStopped(f"cannot create the staging folder {stage} next to --out ({e.strerror or e}); "
                           f"check the permissions and free space of {out.parent}") from e
    try:
        summary = build(stage)
    except BaseException as e:
        kept = list(stage.glob(SHARD_PATTERN))
        if not kept and isinstance(e, ValueError | FileNotFoundError) and not isinstance(e, OSError):
            shutil.rmtree(stage, ignore_errors=True)
            raise
        where = f"kept in {stage}" if stage.is_dir() else "lost"
        raise BuildStopped(f"the build stopped ({_describe(e)}); the records accepted so far are {where} "
                           f"(card.json there says how many); {out} is unchanged") from e
    if old and summary.written == 0:  # a rebuild that rejected everything never replaces a set
        raise BuildStopped(f"the new build rejected every record (reasons in {stage / 'rejected.jsonl'}); "
                           f"{out} keeps its previous set")
    _swap_in(stage, out)
    summary.out_dir = out
    return summary


def _describe(e: BaseException) -> str:
    if isinstance(e, BuildStopped):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"No space left on device writing {e.filename or 'the output'}: free space or choose another --out"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"{type(e).__name__}: {e}"


def _swap_in(stage: Path, out: Path) -> None:
    """Replace ``out`` by ``stage`` (two renames); files of ``out`` that are not a build are moved over."""
    if not out.exists():
        stage.rename(out)
        return
    retired = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    shutil.rmtree(retired, ignore_errors=True)
    out.rename(retired)
    stage.rename(out)
    old = {p.name for p in _old_build(retired)}
    for path in retired.iterdir():
        if path.name not in old and not (out / path.name).exists():
            path.rename(out / path.name)
    shutil.rmtree(retired, ignore_errors=True)


class _Rejected:
    """Appends rejections to ``rejected.jsonl`` (created even when empty, so a reader knows it was checked)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        path.write_text("")

    def add(self, rej: Rejection) -> None:
        self.count += 1
        line = {**rej.where, "record": rej.record, "reason": rej.reason}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")


def _where(cand: Candidate) -> dict[str, Any]:
    """Where a candidate came from, for ``rejected.jsonl``: its id and, for a manifest record, its line."""
    return {"line": cand.source["line"], "id": cand.id} if "line" in cand.source else {"id": cand.id}


def _records(items: Iterable[Candidate | Rejection], s: BuildSettings,
             rejected: _Rejected) -> Iterator[DipRecord]:
    """Disrupt candidates, add M_d in batches, yield finished records (rejections go to ``rejected``).

    Any exception of one candidate's disruption rejects that candidate; when the source itself fails (or the
    build is interrupted) the pending batch is still yielded before the exception goes on.
    """
    pending: list[tuple[Candidate, str, Any]] = []

    def flush() -> Iterator[DipRecord]:
        maps = compute_m_d([c.image for c, _, _ in pending], s.patch, s.sigma, s.bins)
        for (c, name, res), m_d in zip(pending, maps, strict=True):
            yield DipRecord(id=c.id, prompt=c.prompt, positive=c.image, negative=res.negative, regions=c.regions,
                            m_prior=res.m_prior, references=c.references, ref_masks=c.ref_masks, m_d=m_d,
                            m_d_patch=s.patch, disruption=name, disrupted=res.subjects, params=res.params,
                            source=c.source)
        pending.clear()

    source = iter(items)
    while True:
        try:
            item = next(source)
        except StopIteration:
            break
        except BaseException:
            if pending:
                yield from flush()
            raise
        if isinstance(item, Rejection):
            rejected.add(item)
            continue
        try:
            name, res = disrupt(item, s.mix)
        except DisruptionError as e:
            rejected.add(Rejection(_where(item), item.source, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - a plug-in's failure on one record rejects that record only
            rejected.add(Rejection(_where(item), item.source, f"disruption failed ({type(e).__name__}: {e})"))
            continue
        pending.append((item, name, res))
        if len(pending) >= MD_BATCH:
            yield from flush()
    if pending:
        yield from flush()


def run_build(items: Iterable[Candidate | Rejection], out_dir: Path, s: BuildSettings, total: int | None,
              card_extra: dict[str, Any]) -> BuildSummary:
    """Write every good record of ``items`` into shards under ``out_dir``; list the bad ones; write the card."""
    mix = check_mix(s.mix)
    s = BuildSettings(**{**s.__dict__, "mix": mix})
    summary = BuildSummary(out_dir)
    rejected = _Rejected(out_dir / "rejected.jsonl")
    disr: Counter[str] = Counter()
    subj: Counter[int] = Counter()
    start = time.perf_counter()
    writer = ShardWriter(out_dir, s.shard_records)
    try:
        with writer, _progress(s.progress, total) as tick:
            for rec in _records(items, s, rejected):
                try:
                    rec.validate()
                except Exception as e:  # noqa: BLE001 - a broken record is listed, never written
                    rejected.add(Rejection({**({"line": rec.source["line"]} if "line" in rec.source else {}),
                                            "id": rec.id}, rec.source, str(e)))
                    continue
                writer.write(rec)
                disr[rec.disruption] += 1
                subj[rec.num_subjects] += 1
                tick(writer.count, rejected.count)
    except BaseException:
        _write_partial_card(out_dir, writer, rejected)
        raise
    summary.seconds = time.perf_counter() - start
    summary.written, summary.rejected = writer.count, rejected.count
    summary.disruptions, summary.subjects = dict(sorted(disr.items())), dict(sorted(subj.items()))
    summary.shards = [p.name for p in writer.shards]
    summary.never_drawn = {n: _needs(n) for n in mix if n not in disr}
    card = {"format": FORMAT, "build_version": BUILD_VERSION, **card_extra, "complete": True,
            "records": summary.written, "rejected": summary.rejected,
            "shards": summary.shards, "disruption_mix": mix, "disruption_counts": summary.disruptions,
            "never_drawn": summary.never_drawn,
            "subject_counts": {str(k): v for k, v in summary.subjects.items()}, "seed": s.seed,
            "m_d_patch": s.patch, "dpce": {"sigma": s.sigma, "bins": s.bins}, "command": s.command,
            "seconds": round(summary.seconds, 3), "records_per_s": round(summary.records_per_s, 1)}
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return summary


def _write_partial_card(out_dir: Path, writer: ShardWriter, rejected: _Rejected) -> None:
    """The card of a build that stopped: how many records its (closed, valid) shards hold."""
    card = {"format": FORMAT, "build_version": BUILD_VERSION, "complete": False, "records": writer.count,
            "rejected": rejected.count, "shards": [p.name for p in writer.shards]}
    try:
        (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    except OSError:
        pass  # the output itself failed (full disk): the exception that stopped the build says so


def _needs(name: str) -> str:
    """What disruption ``name`` needs, in words (for the card and the build summary)."""
    d = get_disruption(name)
    parts = ([f">= {d.min_subjects} subjects"] if d.min_subjects > 1 else []) + list(d.needs)
    return "needs " + ", ".join(parts) if parts else "drawable for every record"


class _progress:
    """A rich progress bar with records/s (or a no-op), as a context manager yielding ``tick(done, bad)``."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda done, bad: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("dip build"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]:.1f} rec/s, {task.fields[bad]} rejected"),
                            TimeElapsedColumn(), console=Console(file=sys.stderr))
        task = self.bar.add_task("build", total=self.total, rate=0.0, bad=0)
        t0 = time.perf_counter()
        self.bar.start()

        def tick(done: int, bad: int) -> None:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            self.bar.update(task, completed=done + bad, rate=rate, bad=bad)
        return tick

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def cache_key(cfg, patch: int) -> str:
    """A short hash of everything a toy build depends on (world, data mix/size/seed, patch, DPCE settings)."""
    blob = json.dumps({"format": FORMAT, "version": BUILD_VERSION, "world": asdict(cfg.world), "n": cfg.data.n_records,
                       "seed": cfg.data.seed, "mix": cfg.data.disruptions, "patch": patch,
                       "sigma": cfg.focus.sigma, "bins": cfg.focus.bins}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_build(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` into a sibling temp folder and rename it to ``final`` (never half a set)."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same build first: keep theirs
            if not (final / "card.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
