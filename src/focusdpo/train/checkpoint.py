"""Atomic training checkpoints and exact resume (DESIGN section 7, issue 6 point 3).

A checkpoint is a folder ``<run>/checkpoints/step-<NNNNNNNN>/`` holding

- ``lora.safetensors``: the adapter weights (the only trained parameters),
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict`` (read back with ``weights_only=True``); with a
  sharded optimizer (FSDP, DeepSpeed ZeRO) one ``optimizer-rank<r>.pt`` per process instead,
- ``rng.pt``: the Python, NumPy, torch CPU and accelerator RNG states of every process (rank order),
- ``state.json``: the optimizer step, the data position (epoch, batch within the epoch) and the world size,
- ``config.yaml``: the resolved config of the run,
- ``dataset.json``: the fingerprint of the DIP set it trained on (card hash and shard sizes), when given,
- ``refresh.json``, ``refresh.parquet``: the on-policy refresh's rounds and pool, when the run has one
  (:mod:`focusdpo.train.refresh`; written as ``extra_files``),
- ``checksums.json``, written last: the SHA-256 and size of every other file.

Verification (issue 15 point 4): :func:`load_checkpoint` checks ``checksums.json`` first and names the file
that differs; every file's parse error is named too. :func:`newest_intact` walks back from the newest
checkpoint to the newest one that loads, listing the corrupt ones it skipped, which :func:`set_aside` renames to
hidden ``.corrupt-step-N`` folders (kept for inspection, never loaded, and no obstacle to writing that step
again). Checkpoints written before checksums existed load without that check. LoRA tensors must be finite.

Atomicity: everything is written into a hidden sibling ``.tmp-step-<N>`` folder, flushed to disk and
then renamed to its final name in one ``os.replace``. A reader only ever sees complete folders, so a process
killed at any moment (``kill -9`` included) leaves the previous checkpoints intact; leftover temp folders are
removed by :func:`clean_stale`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from focusdpo.runs import PREFIX, checkpoint_dir, latest_checkpoint, list_checkpoints  # noqa: F401

TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = ".corrupt-"
CHECKSUMS = "checksums.json"
# The files save_checkpoint writes itself (anything else in a checkpoint folder is an extra file).
_OWN_FILES = ("lora.safetensors", "scheduler.pt", "rng.pt", "config.yaml", "state.json", "dataset.json", CHECKSUMS)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run; the message says which and the fix."""


@dataclass
class TrainState:
    """Where the run stands after ``step`` optimizer steps.

    ``epoch`` and ``batch_in_epoch`` locate the next global batch the data loader yields; ``world_size`` is
    the number of processes that wrote the checkpoint.
    """

    step: int
    epoch: int
    batch_in_epoch: int
    world_size: int


def step_dir(run_dir: str | Path, step: int) -> Path:
    """The final folder of the checkpoint taken after ``step`` optimizer steps."""
    return checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"


def clean_stale(run_dir: str | Path) -> list[Path]:
    """Remove temp folders left by a process killed while writing; returns what was removed."""
    root = checkpoint_dir(run_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` needs nested tuples; lists may come back from serialisation."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------ save and load


def temp_dir(run_dir: str | Path, step: int) -> Path:
    """The hidden folder a checkpoint of ``step`` is written into before its rename."""
    final = step_dir(run_dir, step)
    return final.parent / f"{TMP_PREFIX}{final.name}"


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create (empty) the temp folder of the checkpoint of ``step``; the main process calls it first."""
    tmp = temp_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_optimizer_shard(tmp: Path, rank: int, optimizer: Mapping[str, Any]) -> None:
    """Each process's optimizer state when it is sharded (FSDP, DeepSpeed ZeRO): ``optimizer-rank<r>.pt``.

    The run folder must then be on storage every process (every machine) sees.
    """
    torch.save(dict(optimizer), tmp / f"optimizer-rank{rank:03d}.pt")


def save_checkpoint(run_dir: str | Path, state: TrainState, lora: Mapping[str, torch.Tensor],
                    optimizer: Mapping[str, Any] | None, scheduler: Mapping[str, Any],
                    rng: Sequence[Mapping[str, Any]], config_yaml: str, started: bool = False,
                    dataset: Mapping[str, Any] | None = None, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write one checkpoint atomically and return its final folder (main process only).

    ``lora``: adapter tensors; ``optimizer``/``scheduler``: their ``state_dict()`` (``optimizer`` None: every
    process already wrote its shard with :func:`write_optimizer_shard` into the folder of
    :func:`begin_checkpoint`, and ``started`` is True); ``rng``: one :func:`capture_rng` dict per process in
    rank order; ``dataset``: the data set's fingerprint (``dataset.json``); ``extra_files``: more files written
    verbatim (name -> bytes; the on-policy refresh's state), covered by the checksums. A complete checkpoint of the same
    step is kept as it is (it holds the same state). ``checksums.json`` is written last.
    """
    final = step_dir(run_dir, state.step)
    if final.is_dir():
        return final
    tmp = temp_dir(run_dir, state.step) if started else begin_checkpoint(run_dir, state.step)
    if optimizer is not None:
        torch.save(dict(optimizer), tmp / "optimizer.pt")
    elif not any(tmp.glob("optimizer-rank*.pt")):
        raise CheckpointError(f"{tmp}: no optimizer state given and no optimizer-rank*.pt shard written")
    save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
    torch.save(dict(scheduler), tmp / "scheduler.pt")
    torch.save([dict(r) for r in rng], tmp / "rng.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    if dataset is not None:
        (tmp / "dataset.json").write_text(json.dumps(dict(dataset), indent=1, sort_keys=True))
    for name, data in (extra_files or {}).items():
        if name in _OWN_FILES or "/" in name or name.startswith((".", "optimizer")):
            raise CheckpointError(f"extra checkpoint file name {name!r} is reserved or not a plain file name")
        (tmp / name).write_bytes(data)
    _write_checksums(tmp)
    _fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def load_checkpoint(path: str | Path, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint folder: ``state`` (:class:`TrainState`), ``lora``, ``optimizer`` (this ``rank``'s
    shard when the optimizer was sharded), ``scheduler``, ``rng`` (list per rank), ``config_yaml``,
    ``dataset`` (None when not recorded) and ``extra_files`` (name -> bytes of every other file). Tensors load
    on the CPU with ``weights_only=True``.
    :class:`CheckpointError` names the file when a checksum differs or a file does not parse."""
    path = Path(path)
    opt = path / "optimizer.pt"
    if not opt.is_file() and (path / f"optimizer-rank{rank:03d}.pt").is_file():
        opt = path / f"optimizer-rank{rank:03d}.pt"
    needed = ("state.json", "lora.safetensors", opt.name, "scheduler.pt", "rng.pt", "config.yaml")
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}): resume from "
                              f"another folder under {path.parent} or delete this one")
    verify_checkpoint(path)
    out = {
        "state": _read(path / "state.json", lambda f: TrainState(**json.loads(f.read_text()))),
        "lora": _read(path / "lora.safetensors", lambda f: load_file(str(f))),
        "optimizer": _read(opt, _torch_load),
        "scheduler": _read(path / "scheduler.pt", _torch_load),
        "rng": _read(path / "rng.pt", _torch_load),
        "config_yaml": _read(path / "config.yaml", lambda f: f.read_text()),
        "dataset": _read(path / "dataset.json", lambda f: json.loads(f.read_text()))
        if (path / "dataset.json").is_file() else None,
        "extra_files": {f.name: _read(f, lambda g: g.read_bytes()) for f in sorted(path.iterdir())
                        if f.is_file() and f.name not in _OWN_FILES and not f.name.startswith("optimizer")},
    }
    bad = [k for k, v in out["lora"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path}: lora.safetensors holds NaN or inf in {bad[:3]} ({len(bad)} "
                              f"tensors): resume from an earlier checkpoint")
    return out


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read(path: Path, reader: Any) -> Any:
    """``reader(path)``, any failure turned into a :class:`CheckpointError` that names the file."""
    try:
        return reader(path)
    except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, RuntimeError, SafetensorError, JSON...
        raise CheckpointError(f"checkpoint file {path} is corrupt ({type(e).__name__}: {e or 'empty'}): resume "
                              f"from an earlier checkpoint (move {path.parent} away)") from e


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    table = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(table, indent=1))


def verify_checkpoint(path: str | Path) -> None:
    """Check every file against ``checksums.json`` (:class:`CheckpointError` naming the first that differs).

    A checkpoint without ``checksums.json`` (written before it existed) passes unchecked.
    """
    path = Path(path)
    table_file = path / CHECKSUMS
    if not table_file.is_file():
        return
    table = _read(table_file, lambda f: json.loads(f.read_text()))
    for name, want in sorted(table.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; resume from an earlier "
                                  f"checkpoint")
        if file.stat().st_size != want["bytes"] or _sha256(file) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {file} does not match its checksum ({CHECKSUMS}): it was "
                                  f"changed or damaged after it was written; resume from an earlier checkpoint")


def newest_intact(run_dir: str | Path, rank: int = 0) -> tuple[Path | None, dict[str, Any] | None,
                                                                  list[tuple[Path, str]]]:
    """The newest checkpoint that verifies and loads: ``(folder, load_checkpoint(folder), skipped)`` where
    ``skipped`` lists the newer corrupt ones with the reason; ``(None, None, skipped)`` when none loads."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, rank), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, None, skipped


def set_aside(path: str | Path) -> Path:
    """Rename a corrupt checkpoint folder to a hidden ``.corrupt-<name>`` sibling (never loaded again)."""
    path = Path(path)
    target = path.with_name(f"{CORRUPT_PREFIX}{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}.{n}")
    path.rename(target)
    return target


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
