"""What a run writes while it trains (main process only): ``metrics.csv``, the tracker, progress bar.

``metrics.csv`` has one row per logged optimizer step; the columns are fixed (:data:`COLUMNS`, ``step`` and
``loss`` first) so runs of different objectives line up; a metric an objective does not have is empty (NaN).
It is written whatever ``train.report_to`` says. The tracker (TensorBoard, W&B, MLflow or none: accelerate's
trackers, :mod:`focusdpo.train.trackers`) gets the scalars every ``train.log_every`` steps and the images.
``peak_mem_mib`` is the peak memory of the step's interval (CUDA allocated, or the CPU process's peak RSS; the
run's ``memory.json`` says which, with the weight bytes by part: :mod:`focusdpo.train.memory`).
On resume the file is cut back to the rows of steps the checkpoint covers and TensorBoard purges later events,
so a run killed after its last checkpoint logs every step exactly once.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from focusdpo.config import Config
from focusdpo.train import trackers

# DESIGN 2.2's step metrics, then optimisation and timing.
COLUMNS = (
    "step", "loss", "implicit_acc", "margin", "err_w", "err_l", "ref_err_w", "ref_err_l",
    "w_in_prior", "w_out_prior", "w_confused", "w_aligned", "a", "gate", "lr", "grad_norm",
    "time_data", "time_forward", "time_backward", "time_optim", "steps_per_s", "peak_mem_mib",
)


class RunLog:
    """Appends step metrics to ``<run>/metrics.csv`` and the run's tracker and drives a progress bar.

    Args:
        run_dir: the run folder. start_step: steps already done (0, or the resumed checkpoint's step).
        max_steps: the last step (progress bar total). enabled: False on non-main processes (writes nothing).
        cfg: the run's config: its ``train.report_to`` tracker is started here and finished by :meth:`close`
            (None: ``metrics.csv`` only).
    """

    def __init__(self, run_dir: Path, start_step: int, max_steps: int, enabled: bool = True,
                 progress: bool = True, cfg: Config | None = None) -> None:
        self.enabled = enabled
        self.csv_path = run_dir / "metrics.csv"
        self._writer = None
        self._bar = None
        self._last_time = time.perf_counter()
        if not enabled:
            return
        _truncate_csv(self.csv_path, start_step)
        new = not self.csv_path.exists()
        self._fh = open(self.csv_path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._fh)
        if new:
            self._csv.writerow(COLUMNS)
            self._fh.flush()
        if cfg is not None:
            self._writer = trackers.make_tracker(cfg, run_dir, start_step)
            if self._writer is not None:
                trackers.start_tracker(self._writer, cfg, run_dir)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float], scalars: bool = True) -> None:
        """One optimizer step's metrics (floats; missing columns are written empty) into ``metrics.csv``;
        into the tracker too (as ``train/<name>``, finite values) when ``scalars`` (``train.log_every``)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        metrics = {**metrics, "steps_per_s": 1.0 / max(now - self._last_time, 1e-9)}
        self._last_time = now
        row = [step] + [_fmt(metrics.get(c)) for c in COLUMNS[1:]]
        self._csv.writerow(row)
        self._fh.flush()
        if scalars and self._writer is not None:
            finite = {f"train/{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
            self._writer.log(finite, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('implicit_acc', math.nan):.2f}",
                                  sps=f"{metrics['steps_per_s']:.2f}")

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A ``uint8 [H, W, 3]`` image into the tracker."""
        if self.enabled and self._writer is not None:
            trackers.log_image(self._writer, tag, image, step)

    def message(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._writer is not None:
            self._writer.finish()
        if self._bar is not None:
            self._bar.close()


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.8g}"


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows of steps ``<= last_step`` (all of them are covered by the checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        path.unlink()
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(kept)
    tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """``metrics.csv`` of a run as a list of rows (column -> float, NaN for empty)."""
    with open(Path(run_dir) / "metrics.csv", newline="") as fh:
        return [{k: (float(v) if v != "" else math.nan) for k, v in row.items()} for row in csv.DictReader(fh)]
