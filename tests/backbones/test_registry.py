"""The backbone registry: ``model.backbone`` accepts exactly the registered names, each backbone has its own config
section (``model.<name>``, typed by the dataclass it registered), a field of another backbone is refused with its
owner named, and a new backbone is one ``register_backbone`` call (made here, in the test, or by a plug-in module)
that the config validation and ``load_backbone`` then use."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import focusdpo.backbones as backbones
import focusdpo.plugins as plugins
from focusdpo.backbones import backbone_names, backbone_spec, load_backbone, register_backbone
from focusdpo.backbones.options import FluxOptions, FluxTinyOptions
from focusdpo.cli import app
from focusdpo.config import Config, ConfigError, ModelConfig, load_config


@dataclasses.dataclass
class UnetOptions:
    channels: int = 32
    attention: str = "xformers"


def test_builtin_names_and_sections() -> None:
    assert backbone_names()[:3] == ("flux-tiny", "flux", "flux2")
    assert backbone_spec("flux-tiny").options is FluxTinyOptions and backbone_spec("flux").options is FluxOptions
    assert all(backbone_spec(n).prediction == "flow" for n in ("flux-tiny", "flux", "flux2"))


def test_a_registered_backbone_is_validated_loaded_and_gets_its_section(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="model.backbone='toy-unet' is invalid: allowed one of flux-tiny, flux"):
        ModelConfig(backbone="toy-unet")
    seen = []
    monkeypatch.setattr(backbones, "_BACKBONES", dict(backbones._BACKBONES))
    register_backbone("toy-unet", lambda cfg, device: seen.append((cfg.checkpoint, cfg.options, device))
                      or "the backbone", options=UnetOptions, prediction="epsilon")
    cfg = load_config(None, ["model.backbone=toy-unet", "model.checkpoint=x", "model.toy-unet.channels=64"])
    assert cfg.model.options == UnetOptions(channels=64)
    assert "  toy-unet:\n    channels: 64\n    attention: xformers\n" in cfg.to_yaml()
    assert Config.from_yaml(cfg.to_yaml()) == cfg
    assert load_backbone(cfg.model, device="cpu") == "the backbone"
    assert seen == [("x", UnetOptions(channels=64), "cpu")]
    with pytest.raises(ValueError, match="'toy-unet' is already registered"):
        register_backbone("toy-unet", lambda cfg, device: None)
    with pytest.raises(ConfigError, match="model.toy-unet.channels='wide' is invalid: expected int"):
        load_config(None, ["model.backbone=toy-unet", "model.toy-unet.channels=wide"])


def test_another_backbones_field_or_section_names_its_owner() -> None:
    with pytest.raises(ConfigError, match=r"model.flux=\{'guidance': 4.0\} is the section of backbone flux, but "
                                          r"model.backbone='flux-tiny': remove it or set model.backbone=flux"):
        load_config(None, ["model.flux.guidance=4.0"])
    with pytest.raises(ConfigError, match="model.lora_import='u.safetensors' belongs to backbone flux "
                                          r"\(model.flux.lora_import\), but model.backbone='flux2'"):
        ModelConfig.of(backbone="flux2", lora_import="u.safetensors")
    with pytest.raises(ConfigError, match="model.guidance=3.0 belongs to backbone flux / flux2"):
        load_config(None, ["model.guidance=3.0"])
    with pytest.raises(ConfigError, match="unknown config key.*model.flux-tiny.guidance: allowed under "
                                          "model.flux-tiny: head_dim, num_heads"):
        load_config(None, ["model.flux-tiny.guidance=3.0"])
    # switching backbone on the command line: the default toy section it leaves behind holds only defaults
    cfg = load_config(None, ["model.backbone=flux", "model.flux.guidance=4.0"])
    assert cfg.model.options == FluxOptions(guidance=4.0)
    assert load_config(None).with_overrides(["model.backbone=flux2"]).model.options.guidance is None
    with pytest.raises(ConfigError, match="is the section of backbone flux, but model.backbone='flux2'"):
        cfg.with_overrides(["model.backbone=flux2"])  # its guidance would be lost without a word
    with pytest.raises(ConfigError, match="is the section of backbone flux-tiny"):
        load_config(None, ["model.flux-tiny.num_layers=5", "model.backbone=flux"])


def test_a_config_written_before_the_sections_loads_with_a_warning(tmp_path) -> None:
    """Run folders of earlier versions hold every model field flat (and focus.top_k): they load unchanged."""
    old = Config().to_dict()
    model = {k: v for k, v in old["model"].items() if k != "flux-tiny"}
    model.update(num_layers=2, num_single_layers=1, num_heads=2, head_dim=16, text_dim=32, lora_import=None,
                 guidance=None, offload_encoders=False, latent_cache=None)
    old["model"], old["focus"]["top_k"] = model, 16
    with pytest.warns(FutureWarning, match="model.num_layers, .*read as model.flux-tiny.num_layers"):
        cfg = Config.from_dict(old)
    assert cfg.model.options == FluxTinyOptions(num_layers=2, num_single_layers=1, num_heads=2, head_dim=16,
                                                text_dim=32)
    with pytest.warns(FutureWarning, match="focus.top_k is no longer a config field"):
        Config.from_dict({"focus": {"top_k": 8}})
    with pytest.raises(ConfigError, match="model.num_layers and model.flux-tiny.num_layers are both set"):
        Config.from_dict({"model": {"num_layers": 2, "flux-tiny": {"num_layers": 3}}})


def test_plugin_module_registers_a_backbone_and_an_objective(tmp_path, monkeypatch) -> None:
    """``--plugin MODULE`` (and FOCUSDPO_PLUGINS, which it sets for child processes) imports a user module before
    the config is validated: its backbone and objective are accepted and listed; a broken one is named."""
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent("""
        from focusdpo.backbones import register_backbone
        from focusdpo.losses import objective_loss
        from focusdpo.objectives import Objective, get_objective, register_objective

        register_backbone("plug-net", lambda cfg, device: None, summary="a plug-in backbone")
        sft = get_objective("sft")
        register_objective(Objective("plug-sft", False, False, False, sft.loss, summary="SFT, by a plug-in"))
    """))
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backbones, "_BACKBONES", dict(backbones._BACKBONES))
    import focusdpo.objectives as objectives

    monkeypatch.setattr(objectives, "_REGISTRY", dict(objectives._REGISTRY))
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setenv(plugins.ENV, "")  # restored (removed) after the test: --plugin writes to it
    result = CliRunner().invoke(app, ["--plugin", "my_plugin", "config", "model.backbone=plug-net",
                                      "train.objective=plug-sft"])
    assert result.exit_code == 0, result.output
    assert "backbone: plug-net" in result.output and "objective: plug-sft" in result.output
    assert "my_plugin" in plugins.os.environ[plugins.ENV]
    listing = CliRunner().invoke(app, ["registry"])
    assert "plug-net" in listing.output and "a plug-in backbone" in listing.output
    assert "plug-sft" in listing.output and "SFT, by a plug-in" in listing.output
    bad = CliRunner().invoke(app, ["--plugin", "broken_plugin", "config"])
    assert bad.exit_code == 2
    assert "plug-in 'broken_plugin' (from FOCUSDPO_PLUGINS) failed to import: RuntimeError: no GPU here" in bad.output
    sys.modules.pop("my_plugin", None)
