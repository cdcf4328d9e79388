"""On-policy DIP (issue 16): the policy being trained makes fresh negatives, a judge keeps the worse ones.

With ``data.refresh_every = E > 0``, before optimizer steps ``0, E, 2E, ...`` (a *round* ``r = step // E``):

1. ``data.refresh_n`` training records are drawn (``numpy`` seeded by ``(train.seed, r)``), and for each a target
   subject; the **current policy** (LoRA on, no grad) regenerates that subject's region exactly as the
   ``regenerate`` disruption does with the frozen base (:func:`focusdpo.data.regenerate.regenerate_region`: the
   tokens touching the region are re-noised to ``data.refresh_strength`` and denoised in
   ``data.refresh_steps`` Euler steps, every other token follows the positive's own noising path), with noise
   seeded by ``(train.seed, r, i)``;
2. the negative is that proposal inside the region and the positive's pixels everywhere else, so it is
   bit-identical to the positive outside ``M_prior = P_target``, as every DIP record (checked by
   :meth:`~focusdpo.data.records.DipRecord.validate`); ``M_d`` stays the positive's;
3. the judge (``data.refresh_judge``, :mod:`focusdpo.judges`) keeps the pairs whose negative is measurably
   worse; the kept pairs replace the pool of the previous round (a round that keeps none leaves the pool as it
   was);
4. every later global batch has its last ``round(data.refresh_mix * global_batch)`` pairs replaced by pool
   pairs of the batch's own subject count and sizes (drawn without replacement where the pool allows, seeded by
   ``(train.seed, step, micro-batch)``), so a step sees the same pairs for any number of processes.

Every round appends one JSON line to ``<run>/refresh.jsonl``: candidates, kept, rejections by reason, kept
reasons, the judge's mean score gap (kept and all), the pool size and the round's wall time. The pool and the
round counter are checkpointed (``refresh.parquet`` and ``refresh.json`` in the checkpoint folder), so a
``--resume`` redoes the round due at the resumed step with the restored LoRA and continues with the same pairs,
noise and losses. Every process computes every round itself (same seeds, same result); sharded weights (FSDP,
DeepSpeed) are refused.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Hashable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from focusdpo.config import Config, ConfigError
from focusdpo.data.dataset import collate_dip, record_item, uncollate_dip
from focusdpo.data.records import DipRecord
from focusdpo.judges import Candidate, make_judge

STATE_FILE = "refresh.json"
POOL_FILE = "refresh.parquet"
LOG_FILE = "refresh.jsonl"
_ROUND_KEY = 1606  # keeps the refresh's seeds apart from the data order's and the noise's
_MIX_KEY = 1607
REGEN_BATCH = 16  # records regenerated in one batch (one forward per Euler step for all of them)


def _record_key(rec: DipRecord) -> Hashable:
    return (rec.num_subjects, rec.size, tuple(r.shape for r in rec.references))


def batch_key(item: dict[str, Any]) -> Hashable:
    """The (subject count, sizes) key of one batch item: pairs sharing it can be stacked."""
    return (len(item["references"]), tuple(item["positive"].shape), tuple(tuple(r.shape) for r in item["references"]),
            int(item["m_d_patch"]))


def build_judge(cfg: Config, device: Any = None) -> Any:
    """The judge of ``data.refresh_judge`` (the toy world of ``cfg.world``; the matching judge embeds with DINO of
    ``eval.dino_model`` or, ``data.refresh_embedder=toy``, the toy world's embedding)."""
    name = cfg.data.refresh_judge
    if name == "toy":
        from focusdpo.world import World

        return make_judge("toy", world=World(cfg.world))
    if name == "matching":
        if cfg.data.refresh_embedder == "toy":
            from focusdpo.world.embedding import subject_embedder

            embed = subject_embedder()
        else:
            from focusdpo.judges import dino_embedder

            embed = dino_embedder(cfg.eval.dino_model, str(device or "cpu"))
        return make_judge("matching", embed=embed, margin=cfg.data.refresh_margin)
    return make_judge(name)


class OnPolicy:
    """The refresh state of a run: the pool of kept on-policy pairs and the rounds done (module docstring)."""

    def __init__(self, cfg: Config, dataset: Any, backbone: Any, judge: Any, run_dir: Path,
                 main_process: bool = True) -> None:
        self.cfg, self.dataset, self.backbone, self.judge = cfg, dataset, backbone, judge
        self.run_dir, self.main = Path(run_dir), main_process
        self.pool: list[DipRecord] = []
        self._items: list[dict[str, Any]] = []
        self._keys: list[Hashable] = []
        self.rounds = 0  # rounds done
        self.time_s = 0.0  # wall time of the rounds of this process (this session)

    # ------------------------------------------------------------------------------------------- rounds

    def due(self, step: int) -> bool:
        """Whether a round is due before optimizer step ``step + 1`` (``step`` steps done)."""
        every = self.cfg.data.refresh_every
        return every > 0 and step % every == 0 and self.rounds <= step // every

    def run_round(self, step: int, autocast: Any = None) -> dict[str, Any]:
        """Regenerate, judge, replace the pool; returns (and logs) the round's row."""
        from focusdpo.data.regenerate import RegenerateSettings

        t0 = time.perf_counter()
        cfg, d = self.cfg, self.cfg.data
        r = step // d.refresh_every
        rng = np.random.default_rng([cfg.train.seed, _ROUND_KEY, r])
        n = min(d.refresh_n, len(self.dataset))
        chosen = sorted(int(i) for i in rng.choice(len(self.dataset), size=n, replace=False))
        targets = [int(rng.integers(self.dataset.keys[i][0])) for i in chosen]  # keys[i][0]: K
        settings = RegenerateSettings(d.refresh_strength, d.refresh_steps, d.refresh_guidance)
        records = [self.dataset.record(i) for i in chosen]
        proposals = self._regenerate(records, targets, settings, r, autocast)
        kept: list[DipRecord] = []
        reasons: Counter[str] = Counter()
        gaps, kept_gaps = [], []
        for rec, target, proposal in zip(records, targets, proposals, strict=True):
            negative = np.where(rec.regions[target][..., None], proposal, rec.positive)
            verdict = self.judge.judge(Candidate(rec.positive, negative, rec.regions, rec.prompt, rec.references,
                                                 rec.source), target)
            reasons[verdict.reason] += 1
            if np.isfinite(verdict.gap):
                gaps.append(verdict.gap)
            if not verdict.keep:
                continue
            kept_gaps.append(verdict.gap)
            new = DipRecord(
                id=f"{rec.id}@r{r}", prompt=rec.prompt, positive=rec.positive, negative=negative,
                regions=rec.regions, m_prior=rec.regions[target].copy(), references=rec.references,
                ref_masks=rec.ref_masks, m_d=rec.m_d, m_d_patch=rec.m_d_patch, disruption="on_policy",
                disrupted=[target],
                params={"round": r, "step": step, "judge": self.judge.name, "reason": verdict.reason,
                        "gap": verdict.gap, "strength": settings.strength, "steps": settings.steps,
                        "guidance": settings.guidance, **_jsonable(verdict.details)},
                source={**rec.source, "on_policy_of": rec.id})
            new.validate()
            kept.append(new)
        if kept:
            self._set_pool(kept)
        self.rounds = r + 1
        elapsed = time.perf_counter() - t0
        self.time_s += elapsed
        keep_reasons = {k: v for k, v in sorted(reasons.items()) if k in {p.params["reason"] for p in kept}}
        row = {"round": r, "step": step, "judge": self.judge.name, "candidates": n, "kept": len(kept),
               "kept_by_reason": keep_reasons,
               "rejected": {k: v for k, v in sorted(reasons.items()) if k not in keep_reasons},
               "gap_kept": _mean(kept_gaps), "gap_all": _mean(gaps), "pool": len(self.pool),
               "time_s": round(elapsed, 4)}
        if self.main:
            with open(self.run_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        return row

    def _regenerate(self, records: list[DipRecord], targets: list[int], settings: Any, r: int,
                    autocast: Any) -> list[np.ndarray]:
        """The policy's proposals for every record, batched by (subject count, sizes) in chunks of
        :data:`REGEN_BATCH`; record ``j``'s noise is seeded by ``(train.seed, round, j)`` whatever its batch."""
        from focusdpo.data.regenerate import regenerate_regions

        groups: dict[Hashable, list[int]] = {}
        for j, rec in enumerate(records):
            groups.setdefault(_record_key(rec), []).append(j)
        out: list[np.ndarray | None] = [None] * len(records)
        net = self.backbone.trainable()
        was_training = net.training
        net.eval()
        try:
            for members in groups.values():
                for start in range(0, len(members), REGEN_BATCH):
                    chunk = members[start:start + REGEN_BATCH]
                    rngs = [np.random.default_rng([self.cfg.train.seed, _ROUND_KEY, r, j]) for j in chunk]
                    with autocast() if autocast is not None else nullcontext():
                        props = regenerate_regions(
                            self.backbone, [records[j].positive for j in chunk],
                            [records[j].regions[targets[j]] for j in chunk], [records[j].prompt for j in chunk],
                            [records[j].references for j in chunk], settings, rngs)
                    for j, p in zip(chunk, props, strict=True):
                        out[j] = p
        finally:
            net.train(was_training)
        return out  # type: ignore[return-value]

    def _set_pool(self, records: list[DipRecord]) -> None:
        self.pool = list(records)
        self._items = [record_item(rec) for rec in self.pool]
        self._keys = [batch_key(it) for it in self._items]

    # ---------------------------------------------------------------------------------------------- mixing

    def mix(self, batch: dict[str, Any], step: int, micro: int, rank: int, world: int) -> dict[str, Any]:
        """``batch`` (this process's slice) with its share of the global batch's last positions from the pool."""
        b = len(batch["id"])
        global_b = b * world
        m = int(round(self.cfg.data.refresh_mix * global_b))
        if m == 0 or not self.pool:
            return batch
        items = uncollate_dip(batch)
        key = batch_key(items[0])
        same = [i for i, k in enumerate(self._keys) if k == key]
        if not same:
            return batch
        rng = np.random.default_rng([self.cfg.train.seed, _MIX_KEY, step, micro])
        picks = rng.choice(same, size=m, replace=len(same) < m)
        for p in range(rank * b, (rank + 1) * b):
            if p >= global_b - m:
                items[p - rank * b] = self._items[int(picks[p - (global_b - m)])]
        return collate_dip(items)

    # -------------------------------------------------------------------------------------- checkpointing

    def state_files(self) -> dict[str, bytes]:
        """The files a checkpoint holds for the refresh: ``refresh.json`` and ``refresh.parquet`` (the pool)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from focusdpo.data.parquet import SCHEMA, record_to_row

        table = pa.Table.from_pylist([record_to_row(rec) for rec in self.pool], schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        state = {"rounds": self.rounds, "pool": len(self.pool), "pool_ids": [rec.id for rec in self.pool]}
        return {STATE_FILE: json.dumps(state, indent=1).encode(), POOL_FILE: buf.getvalue()}

    def load_state_files(self, files: dict[str, bytes], resumed_step: int) -> None:
        """Restore the pool and round counter from a checkpoint's files; cut ``refresh.jsonl`` back to the rounds
        before ``resumed_step`` (the round due at that step runs again)."""
        import pyarrow.parquet as pq

        from focusdpo.data.parquet import row_to_record

        if STATE_FILE not in files or POOL_FILE not in files:
            raise ConfigError(f"data.refresh_every={self.cfg.data.refresh_every} but the checkpoint holds no refresh "
                              f"state ({STATE_FILE}, {POOL_FILE}): it was written by a run without on-policy "
                              f"refresh; resume with data.refresh_every=0 or start a new run")
        state = json.loads(files[STATE_FILE].decode())
        rows = pq.read_table(io.BytesIO(files[POOL_FILE])).to_pylist()
        self._set_pool([row_to_record(row) for row in rows])
        self.rounds = int(state["rounds"])
        log = self.run_dir / LOG_FILE
        if self.main and log.is_file():
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln)["step"] < resumed_step]
            log.write_text("".join(ln + "\n" for ln in keep))


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``refresh.jsonl`` (empty when the run had no refresh)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(details, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def check_refresh(cfg: Config, accelerator: Any) -> None:
    """Refuse what the refresh cannot do before any work (:class:`ConfigError` naming the field)."""
    if cfg.data.refresh_every <= 0:
        return
    kind = str(accelerator.distributed_type)
    if kind.endswith("FSDP") or kind.endswith("DEEPSPEED"):
        raise ConfigError(f"data.refresh_every={cfg.data.refresh_every} is invalid under {kind.split('.')[-1]} "
                          f"(sharded weights cannot sample in one process): allowed 0, or DDP / one process")
