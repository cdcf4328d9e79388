"""train.report_to: the step scalars and validation images reach W&B (offline) and MLflow (local file store)
through accelerate's trackers; metrics.csv is written in every case; a missing library is a clear error."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import wandb_offline
from train_fixtures import tiny_config

from focusdpo.config import ConfigError
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import train


def _csv(run, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run)]


def test_wandb_offline_gets_every_scalar_and_the_images(tiny_env, tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    train(tiny_config(*tiny_env, train__report_to="wandb", train__output_dir=run, train__tracker_project="p"))
    import wandb

    wandb.teardown()  # the wandb-core service writes the run file asynchronously: wait for it to finish
    files = list((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1 and not (run / "tb").exists()
    rows = wandb_offline.history(files[0])
    scalars = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in scalars] == [1, 2, 3]
    assert [r["train/loss"] for r in scalars] == pytest.approx(_csv(run, "loss"), rel=1e-6)
    assert [r["train/grad_norm"] for r in scalars] == pytest.approx(_csv(run, "grad_norm"), rel=1e-6)
    images = [r for r in rows if r.get("val/samples/_type") == "images/separated"]
    assert images and images[-1]["_step"] == 3
    config = wandb_offline.config(files[0])
    assert config["train.report_to"] == "wandb" and config["train.max_steps"] == 3
    assert (run / "trackers.json").read_text().count(files[0].stem.removeprefix("run-")) == 1  # the W&B run id


def test_wandb_resume_continues_the_same_run(tiny_env, tmp_path, monkeypatch) -> None:
    """--resume logs into the W&B run the first part started (its id kept in trackers.json)."""
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    kw = {"train__report_to": "wandb", "train__output_dir": run, "train__checkpoint_every": 1}
    train(tiny_config(*tiny_env, train__max_steps=1, **kw))
    first = json.loads((run / "trackers.json").read_text())["wandb"]
    train(tiny_config(*tiny_env, train__max_steps=2, **kw), resume=True)
    wandb.teardown()
    assert json.loads((run / "trackers.json").read_text())["wandb"] == first
    files = sorted((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    assert [f.stem for f in files] == [f"run-{first}"] * 2  # two sessions of one run
    steps = [r["_step"] for f in files for r in wandb_offline.history(f) if "train/loss" in r]
    assert steps == [1, 2]


def test_mlflow_file_store_gets_every_scalar_and_the_images(tiny_env, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    run = tmp_path / "run"
    train(tiny_config(*tiny_env, train__report_to="mlflow", train__output_dir=run, train__tracker_project="exp"))
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert found.info.run_name == "run" and found.data.params["train.objective"] == "focusdpo"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(_csv(run, "loss"), rel=1e-6)
    lr = client.get_metric_history(found.info.run_id, "train/lr")
    assert [m.value for m in lr] == pytest.approx(_csv(run, "lr"))
    artifacts = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    assert any("val-samples" in a for a in artifacts), artifacts


def test_none_writes_metrics_csv_only(tiny_env, tmp_path) -> None:
    run = tmp_path / "run"
    train(tiny_config(*tiny_env, train__report_to="none", train__output_dir=run, train__max_steps=2))
    assert not (run / "tb").exists() and not (run / "trackers.json").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2] and all(math.isfinite(v) for v in _csv(run, "loss"))


def test_a_missing_tracker_library_is_named_before_any_work(tiny_env, tmp_path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"train.report_to='wandb' needs the wandb package, which is not "
                                          r"installed: pip install 'focusdpo\[trackers\]'"):
        train(tiny_config(*tiny_env, train__report_to="wandb", train__output_dir=out))
    assert not out.exists()


def test_report_to_must_be_a_known_tracker(tiny_env) -> None:
    with pytest.raises(ConfigError, match="train.report_to='comet' is invalid: allowed one of tensorboard, wandb, "
                                          "mlflow, none"):
        tiny_config(*tiny_env, train__report_to="comet")
