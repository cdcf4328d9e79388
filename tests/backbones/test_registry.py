"""The backbone registry: ``model.backbone`` accepts exactly the registered names, and a new backbone is one
``register_backbone`` call (made here, in the test) that the config validation and ``load_backbone`` then use."""

from __future__ import annotations

import pytest

import focusdpo.backbones as backbones
from focusdpo.backbones import backbone_names, load_backbone, register_backbone
from focusdpo.config import ConfigError, ModelConfig


def test_builtin_names() -> None:
    assert backbone_names()[:3] == ("flux-tiny", "flux", "flux2")


def test_a_registered_backbone_is_validated_and_loaded(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="model.backbone='toy-unet' is invalid: allowed one of flux-tiny, flux"):
        ModelConfig(backbone="toy-unet")
    seen = []
    monkeypatch.setitem(backbones._LOADERS, "toy-unet", lambda cfg, device: seen.append((cfg.checkpoint, device))
                        or "the backbone")
    assert load_backbone(ModelConfig(backbone="toy-unet", checkpoint="x"), device="cpu") == "the backbone"
    assert seen == [("x", "cpu")]
    with pytest.raises(ValueError, match="'toy-unet' is already registered"):
        register_backbone("toy-unet", lambda cfg, device: None)
