"""The model card (README.md) of a finished run and of its export: front matter, data card, config, metrics,
samples and the diffusers snippet of each backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from train_fixtures import tiny_config
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import Config, load_config
from focusdpo.train.model_card import write_model_card
from focusdpo.train.run_log import read_metrics
from focusdpo.train.trainer import train


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _config_block(text: str) -> Config:
    return Config.from_yaml(text.split("```yaml\n", 1)[1].split("```", 1)[0])


@pytest.fixture(scope="module")
def finished(tiny_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("card") / "run"
    cfg = tiny_config(*tiny_env, train__output_dir=run, train__report_to="none")
    train(cfg)
    return cfg, run


def test_run_folder_card(finished, tiny_env) -> None:
    from huggingface_hub import ModelCard

    cfg, run = finished
    text = (run / "README.md").read_text()
    card = ModelCard.load(run / "README.md")
    assert card.data.library_name == "focusdpo" and card.data.license == "apache-2.0"
    assert {"focusdpo", "lora", "dpo", "flux-tiny", "text-to-image"} <= set(card.data.tags)
    assert card.data.base_model is None  # the shipped tiny base is no hub id
    assert _config_block(text) == cfg  # the resolved config, verbatim
    data_card = json.loads((tiny_env[0] / "cache").glob("**/card.json").__next__().read_text())
    assert json.loads((run / "dip.json").read_text()) == data_card
    assert json.dumps(data_card, indent=1, sort_keys=True) in text
    last = read_metrics(run)[-1]
    assert "| step | 3 |" in text and f"| loss | {last['loss']:.6g} |" in text
    assert f"| implicit_acc | {last['implicit_acc']:.6g} |" in text
    assert "![samples](val/samples-step-00000003.png)" in text and (run / "val/samples-step-00000003.png").is_file()
    assert "objective: `focusdpo`: FocusDPO" in text and "focusdpo sample --run" in text


def test_export_gets_its_own_card_and_grid(finished, tmp_path) -> None:
    _, run = finished
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export-lora", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "README.md").read_text()
    assert "![samples](samples.png)" in text
    assert np.array_equal(np.asarray(Image.open(out / "samples.png")),
                          np.asarray(Image.open(run / "val/samples-step-00000003.png")))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("backbone, pipeline", [("flux", "FluxPipeline"), ("flux2", "Flux2KleinPipeline")])
def test_real_backbone_card_has_hub_metadata_and_the_pipeline_snippet(tmp_path, backbone, pipeline) -> None:
    """A run folder of a real backbone (config + metrics only): base_model from a hub id, diffusers snippet."""
    from huggingface_hub import ModelCard

    uno = ["model.flux.lora_import=models/UNO/dit_lora.safetensors"] if backbone == "flux" else []
    cfg = load_config(None, [f"model.backbone={backbone}", "model.checkpoint=black-forest-labs/FLUX.1-dev",
                             "train.objective=dpo", *uno])
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    (run / "metrics.csv").write_text("step,loss,implicit_acc\n1,0.7,0.5\n2,0.25,1\n")
    write_model_card(run, load_from="me/my-lora")
    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev" and card.data.library_name == "diffusers"
    assert card.data.license == "other" and backbone in card.data.tags and "dpo" in card.data.tags
    text = (run / "README.md").read_text()
    assert f'{pipeline}.from_pretrained("black-forest-labs/FLUX.1-dev"' in text
    assert 'pipe.load_lora_weights("me/my-lora")' in text
    assert f"First write the diffusers file: `focusdpo export-lora {run}`" in text  # no export in the folder yet
    assert "| loss | 0.25 |" in text and "No validation grid was written." in text
    assert ("UNO's LoRA merged in" in text and "loading it alone reproduces the trained model" in text) == bool(uno)
