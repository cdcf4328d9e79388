"""Experiment tracking through accelerate's trackers (``train.report_to``): TensorBoard, W&B, MLflow or none.

:func:`make_tracker` builds the accelerate ``GeneralTracker`` of the run (``accelerate.tracking``'s
``TensorBoardTracker``, ``WandBTracker`` or ``MLflowTracker``) and :func:`start_tracker` starts it with the
resolved config as hyperparameters; :class:`focusdpo.train.run_log.RunLog` sends it the step scalars
(``train/<metric>``, every ``train.log_every`` steps) and the validation images. ``metrics.csv`` is written
whatever the tracker.

- ``tensorboard``: events in ``<run>/tb`` (a resumed run purges the events after its checkpoint's step).
- ``wandb``: ``wandb.init(project=train.tracker_project, name=<run folder name>, dir=$WANDB_DIR or <run>)``;
  the W&B run id is kept in ``<run>/trackers.json`` so ``--resume`` continues the same W&B run. Offline
  logging: ``WANDB_MODE=offline``. Images: ``wandb.Image``.
- ``mlflow``: experiment ``train.tracker_project``, run named after the run folder, to the tracking URI of
  ``MLFLOW_TRACKING_URI`` (else mlflow's default store in the working folder); the MLflow run id is kept in
  ``trackers.json``.
  Images: ``mlflow.log_image`` (accelerate's MLflow tracker has no image method).

A tracker whose library is missing is a :class:`~focusdpo.config.ConfigError` naming the package to install
(:func:`check_installed`, run before any work).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
from pathlib import Path
from typing import Any

import numpy as np

from focusdpo.config import Config, ConfigError

REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
IDS_FILE = "trackers.json"  # W&B / MLflow run ids of the run, so a resumed run continues the same tracker run
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(report_to: str) -> None:
    """:class:`ConfigError` when ``train.report_to`` names a tracker whose library is not importable."""
    package = _PACKAGE.get(report_to)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.report_to={report_to!r} needs the {package} package, which is not installed: "
                          f"pip install 'focusdpo[trackers]' (or pip install {package}), or set "
                          f"train.report_to to one of {', '.join(r for r in REPORT_TO if r != report_to)}")


def flat_config(cfg: Config) -> dict[str, bool | int | float | str]:
    """The resolved config as ``section.key -> scalar`` (lists, mappings and None as their JSON text)."""
    out: dict[str, bool | int | float | str] = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            scalar = isinstance(value, (bool, int, float, str))
            out[f"{section}.{key}"] = value if scalar else json.dumps(value, sort_keys=True)
    return out


def _run_ids(run_dir: Path) -> dict[str, str]:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_run_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = {**_run_ids(run_dir), name: run_id}
    (run_dir / IDS_FILE).write_text(json.dumps(ids, indent=1) + "\n")


def make_tracker(cfg: Config, run_dir: Path, start_step: int) -> Any | None:
    """The accelerate tracker of ``train.report_to`` for the run in ``run_dir`` (None for ``none``), not started.

    ``start_step``: the step the run (re)starts from; TensorBoard drops its later events on resume.
    """
    kind, project = cfg.train.report_to, cfg.train.tracker_project
    check_installed(kind)
    if kind == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        return TensorBoardTracker("tb", str(run_dir), purge_step=start_step + 1 if start_step else None)
    if kind == "wandb":
        from accelerate.tracking import WandBTracker

        run_id = _run_ids(run_dir).get("wandb")
        if run_id is None:  # W&B's own id form: 8 characters of [a-z0-9]
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            _save_run_id(run_dir, "wandb", run_id)
        return WandBTracker(project, name=run_dir.name, id=run_id, resume="allow",
                            dir=os.environ.get("WANDB_DIR") or str(run_dir))
    if kind == "mlflow":
        from accelerate.tracking import MLflowTracker

        return MLflowTracker(project, run_id=_run_ids(run_dir).get("mlflow"), run_name=run_dir.name)
    return None


def start_tracker(tracker: Any, cfg: Config, run_dir: Path) -> None:
    """Start ``tracker`` and give it the config (W&B config / MLflow params; TensorBoard has ``config.yaml``)."""
    tracker.start()
    if tracker.name == "mlflow":
        _save_run_id(run_dir, "mlflow", tracker.active_run.info.run_id)
    if tracker.name != "tensorboard":
        tracker.store_init_configuration(flat_config(cfg))


def log_image(tracker: Any, tag: str, image: np.ndarray, step: int) -> None:
    """A ``uint8 [H, W, 3]`` image under ``tag`` at ``step``."""
    if tracker.name == "tensorboard":
        tracker.log_images({tag: np.asarray(image)[None]}, step, dataformats="NHWC")
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_image(np.asarray(image), key=tag.replace("/", "-"), step=step)
    else:
        tracker.log_images({tag: [np.asarray(image)]}, step)
