"""One trainer per run folder, and no silent mixing of runs (issue 15 point 2).

- :class:`RunFolderLock`: an OS advisory lock (``fcntl.flock``) on ``<run>/.lock``, held while a trainer uses
  the folder. The kernel drops it when the process ends, however it ends (``kill -9`` included), so there is
  never a stale lock to clean up; the file itself stays (deleting a lock file races with a waiting opener).
  The holder writes its pid and host into the file, so a second trainer can name it. Without ``fcntl``
  (Windows) the lock is a no-op.
- :func:`check_fresh`: a new (non-resume) run refuses a folder that holds any earlier run's files;
  ``overwrite=True`` removes them first, but only files a run writes (anything else is named and kept).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through fcntl
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# What `focusdpo train` (and `export-lora` into the run folder) writes: what --overwrite may remove.
RUN_ENTRIES = ("config.yaml", "metrics.csv", "metrics.csv.tmp", "tb", "val", "checkpoints", "lora.safetensors",
               "lora.safetensors.tmp", "pytorch_lora_weights.safetensors", "trackers.json", "wandb",
               "README.md", "dip.json", "samples.png", "validation",
               "validation.png", "memory.json", "memory.json.tmp")


class RunFolderError(RuntimeError):
    """The run folder is in use by another trainer or holds an earlier run; the message names the fix."""


class RunFolderLock:
    """Exclusive lock of a run folder for this process (create the folder if needed).

    ``created`` tells whether :meth:`acquire` created the folder (so a failed set-up can remove it again).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.created = False
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderError` naming the holder's pid at once (no waiting)."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunFolderError(f"train.output_dir={self.run_dir} is a file, not a folder: choose another "
                                 f"train.output_dir")
        self.created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"cannot create the run folder {self.run_dir} ({e.strerror or e}): check its "
                                 f"permissions or choose another train.output_dir") from e
        if fcntl is None:
            return
        for _ in range(5):  # the lock file may be replaced between open and lock: retry on the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder()
                os.close(fd)
                raise RunFolderError(f"run folder {self.run_dir} is in use by another trainer ({holder}): wait "
                                     f"for it to end, stop it, or choose another train.output_dir") from e
            if self._same_file(fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise RunFolderError(f"could not lock {self.path}: it keeps being replaced; is another program "
                             f"deleting files in {self.run_dir}?")

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "pid unknown"

    def release(self, remove_if_empty: bool = False) -> None:
        """Drop the lock; with ``remove_if_empty``, also remove a folder this lock created and nothing filled."""
        if remove_if_empty and self.created and self.run_dir.is_dir():
            if [p.name for p in self.run_dir.iterdir()] in ([], [LOCK_NAME]):
                self.path.unlink(missing_ok=True)
                self.run_dir.rmdir()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def earlier_run_files(run_dir: str | Path) -> list[str]:
    """Names in ``run_dir`` other than the lock file (sorted); empty for a missing or empty folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)


def check_fresh(run_dir: str | Path, overwrite: bool) -> None:
    """A new run may start in ``run_dir`` only when it holds no earlier run's files.

    ``overwrite``: remove the files a run writes (:data:`RUN_ENTRIES`); files of any other kind are named and
    the run is refused, so ``--overwrite`` never deletes what a run did not write.
    """
    run_dir = Path(run_dir)
    found = earlier_run_files(run_dir)
    if not found:
        return
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    kind = "checkpoints of an earlier run" if "checkpoints" in found else "files of an earlier run"
    if not overwrite:
        raise RunFolderError(f"{run_dir} already holds {kind} ({shown}): continue it with --resume, replace it "
                             f"with --overwrite, or choose another train.output_dir")
    foreign = [name for name in found if name not in RUN_ENTRIES]
    if foreign:
        raise RunFolderError(f"--overwrite: {run_dir} holds files a run does not write ({', '.join(foreign[:6])}); "
                             f"they are kept and nothing was removed: move them away or choose another "
                             f"train.output_dir")
    for name in found:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
