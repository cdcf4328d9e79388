"""focusdpo push / dip push through the real huggingface_hub client against a local stand-in of the Hub's HTTP
API (tests/hub_standin.py: create_repo, preupload, commit), no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from focusdpo.cli import app
from hub_standin import Hub


@pytest.fixture()
def hub(monkeypatch):
    import huggingface_hub.constants

    with Hub() as h:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", h.endpoint)  # what HfApi() defaults to
        # the suite runs the hub offline (tests/conftest.py); the stand-in is local, so this test goes online to it
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
        yield h


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (config, LoRA with rank/alpha metadata, metrics, a validation grid, the data card)."""
    import numpy as np
    import torch
    from PIL import Image

    from focusdpo.config import load_config
    from focusdpo.lora import save_lora

    run = tmp_path_factory.mktemp("push") / "run"
    (run / "val").mkdir(parents=True)
    load_config(None, ["train.max_steps=2"]).save(run / "config.yaml")
    save_lora(run / "lora.safetensors", {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4),
                                         "transformer_blocks.0.attn.to_q.lora_B.weight": torch.full((4, 2), 0.5)},
              metadata={"rank": "2", "alpha": "4", "step": "2"})
    (run / "metrics.csv").write_text("step,loss\n1,0.69\n2,0.5\n")
    (run / "dip.json").write_text(json.dumps({"records": 16, "complete": True}))
    Image.fromarray(np.zeros((8, 24, 3), np.uint8)).save(run / "val/samples-step-00000001.png")
    Image.fromarray(np.full((8, 24, 3), 200, np.uint8)).save(run / "val/samples-step-00000002.png")
    (run / "checkpoints/step-00000002").mkdir(parents=True)
    (run / "checkpoints/step-00000002/optimizer.pt").write_bytes(b"private")
    (run / "trackers.json").write_text("{}")
    return run


def test_push_run_uploads_the_model_files_only(hub, finished_run) -> None:
    result = CliRunner().invoke(app, ["push", str(finished_run), "--repo", "me/my-lora", "--private"])
    assert result.exit_code == 0, result.output
    repo = hub.repos["model", "me/my-lora"]
    assert repo["private"] is True and hub.tokens and set(hub.tokens) == {"hf_standin_token"}
    assert set(repo["files"]) == {"README.md", "pytorch_lora_weights.safetensors", "lora.safetensors", "config.yaml",
                                  "metrics.csv", "dip.json", "val/samples-step-00000002.png"}
    for name in repo["files"]:
        assert repo["files"][name] == (finished_run / name).read_bytes(), name  # byte for byte
    card = repo["files"]["README.md"].decode()
    ((kind, meta),) = hub.validated  # the client had the card's front matter checked before uploading
    assert kind == "model" and meta["library_name"] == "focusdpo" and {"lora", "flux-tiny"} <= set(meta["tags"])
    assert 'load_lora_weights("me/my-lora")' not in card  # flux-tiny: sampled with focusdpo, not diffusers
    assert "hf download me/my-lora --local-dir my-lora\nfocusdpo sample --run my-lora" in card
    assert card.startswith("---\n")
    from safetensors.torch import load

    exported = load(repo["files"]["pytorch_lora_weights.safetensors"])
    assert float(exported["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][0, 0]) == 1.0  # 0.5 * 4/2
    assert "me/my-lora" in result.output and "/commit/" in result.output


def test_push_again_reuses_the_repo(hub, finished_run) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["push", str(finished_run), "--repo", "me/again"]).exit_code == 0
    assert runner.invoke(app, ["push", str(finished_run), "--repo", "me/again"]).exit_code == 0
    assert len(hub.repos["model", "me/again"]["commits"]) == 2 and hub.repos["model", "me/again"]["private"] is False


def test_dip_push_uploads_shards_card_and_a_dataset_card_the_viewer_reads(hub, tmp_path) -> None:
    import datasets
    import yaml

    from focusdpo.data.parquet import read_records

    dip = tmp_path / "dip"
    built = CliRunner().invoke(app, ["dip", "build", "--world", "toy", "--n", "3", "--out", str(dip), "--patch", "8",
                                     "data.shard_records=2", "world.n_identities=40"])
    assert built.exit_code == 0, built.output
    result = CliRunner().invoke(app, ["dip", "push", str(dip), "--repo", "me/my-dip"])
    assert result.exit_code == 0, result.output
    files = hub.repos["dataset", "me/my-dip"]["files"]
    assert set(files) == {"README.md", "card.json", "data-00000.parquet", "data-00001.parquet"}  # no rejected.jsonl
    assert (dip / "rejected.jsonl").exists()
    assert files["data-00001.parquet"] == (dip / "data-00001.parquet").read_bytes()
    readme = files["README.md"].decode()
    front = yaml.safe_load(readme.split("---\n")[1])
    assert hub.validated == [("dataset", front)]
    assert front["configs"][0]["data_files"][0]["path"] == "data-*.parquet"
    assert 'load_dataset("me/my-dip"' in readme and files["card.json"] == (dip / "card.json").read_bytes()
    # what the Hub serves loads as an image dataset
    served = tmp_path / "served"
    served.mkdir()
    for name, data in files.items():
        (served / name).write_bytes(data)
    ds = datasets.load_dataset("parquet", data_files=str(served / "data-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    first = next(read_records(dip))
    assert len(ds) == 3 and ds[0]["id"] == first.id and ds[0]["positive"].size == first.positive.shape[1::-1]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is not a built DIP set"),
    (lambda p: (p.mkdir(), (p / "data-00000.parquet").write_bytes(b"x"),
                (p / "card.json").write_text('{"complete": false}')), "did not complete"),
])
def test_dip_push_refuses_what_is_not_a_finished_set(hub, tmp_path, make, message) -> None:
    make(tmp_path / "dip")
    result = CliRunner().invoke(app, ["dip", "push", str(tmp_path / "dip"), "--repo", "me/x"])
    assert result.exit_code == 2 and message in result.output
    assert hub.repos == {}


def test_push_refuses_an_unfinished_run(hub, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(app, ["push", str(tmp_path / "run"), "--repo", "me/x"])
    assert result.exit_code == 2 and "is not a finished run" in result.output and hub.repos == {}
