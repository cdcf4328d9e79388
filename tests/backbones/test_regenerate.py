"""The ``regenerate`` disruption: inpainting confined to the region, the toy ground-truth check, registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from focusdpo.backbones.flux import build_tiny
from focusdpo.config import ModelConfig, WorldConfig
from focusdpo.data.disruptions import DisruptionContext, apply_disruption, registered_disruptions
from focusdpo.data.regenerate import RegenerateSettings, judge_toy, regenerate_region, token_mask
from focusdpo.world import World

TINY = dict(patch=4, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16, text_dim=16, max_text_tokens=20)


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(n_identities=60))


@pytest.fixture(scope="module")
def scene(world):
    return world.sample_scene(np.random.default_rng(1), split="train", n_subjects=2)


@pytest.fixture(scope="module")
def backbone(world):
    torch.manual_seed(0)
    return build_tiny(ModelConfig.of(**TINY), world.vocabulary())


class _Oracle:
    """A backbone whose velocity is exact for the straight path to ``target`` tokens: regeneration returns it."""

    def __init__(self, inner, target_image):
        self.inner, self.patch = inner, inner.patch
        self.x0 = inner.encode_images(torch.from_numpy(target_image).permute(2, 0, 1)[None].float() / 255).tokens

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, x, t, text, refs, grid, tap=False):
        return (x - self.x0) / t[:, None, None], None


def test_registered_with_its_need():
    d = registered_disruptions()["regenerate"]
    assert d.needs == ("backbone",) and d.min_subjects == 1


def test_token_mask_marks_tokens_touching_the_region():
    region = np.zeros((8, 8), dtype=bool)
    region[0, 5] = True
    region[6:8, 0:2] = True
    assert token_mask(region, 4).flatten().tolist() == [0, 1, 1, 0]


def test_settings_reject_bad_strength():
    with pytest.raises(ValueError, match="strength"):
        RegenerateSettings(strength=0)


def test_regeneration_changes_only_tokens_touching_the_region(backbone, scene):
    region = scene.masks[0]
    out = regenerate_region(backbone, scene.image, region, scene.prompt, scene.references,
                            RegenerateSettings(strength=0.9, steps=3), np.random.default_rng(0))
    touched = token_mask(region, 4).reshape(8, 8).numpy().repeat(4, 0).repeat(4, 1) > 0
    diff = np.abs(out.astype(int) - scene.image.astype(int)).max(-1)
    assert diff[~touched].max() <= 1          # off-region tokens stay on the positive's path (rounding only)
    assert diff[region].mean() > 10           # an untrained model repaints the region


def test_planted_oracle_regenerates_the_positive_and_is_rejected(backbone, scene, world):
    oracle = _Oracle(backbone, scene.image)
    ctx = DisruptionContext(scene.references, scene.ref_masks, scene.prompt,
                            extras={"backbone": oracle, "world": world, "regenerate": RegenerateSettings(steps=4)})
    res = apply_disruption("regenerate", scene.image, scene.masks, np.random.default_rng(0), ctx, target=0)
    assert res.changed == 0 and res.params["kept"] is False


def test_judge_sees_no_change_on_the_positive_and_a_recoloured_body(world, scene):
    assert judge_toy(world, scene.prompt, scene.image, scene.image, 0, scene.references) == ([], [])
    from focusdpo.world.subjects import COLOURS

    own, other = scene.identities
    negative = scene.image.copy()
    body = (negative == np.array(COLOURS[own.body], dtype=np.uint8)).all(-1) & scene.masks[0]
    negative[body] = COLOURS[other.body if other.body != own.body else other.pattern_colour]
    lost, leaked = judge_toy(world, scene.prompt, scene.image, negative, 0, scene.references)
    assert "body" in lost


def test_untrained_regeneration_is_kept_with_what_changed(backbone, scene, world):
    ctx = DisruptionContext(scene.references, scene.ref_masks, scene.prompt,
                            extras={"backbone": backbone, "world": world,
                                    "regenerate": RegenerateSettings(strength=1.0, steps=3)})
    res = apply_disruption("regenerate", scene.image, scene.masks, np.random.default_rng(0), ctx, target=1)
    assert res.params["kept"] is True and res.params["lost"]
    outside = ~res.m_prior
    assert np.array_equal(res.negative[outside], scene.image[outside])


def test_without_a_world_the_proposal_is_unjudged(backbone, scene):
    ctx = DisruptionContext(scene.references, scene.ref_masks, scene.prompt, extras={"backbone": backbone})
    res = apply_disruption("regenerate", scene.image, scene.masks, np.random.default_rng(0), ctx, target=0)
    assert res.params["judged"] is False and res.changed > 0


def test_batched_regeneration_matches_one_at_a_time(world, backbone):
    """regenerate_regions (the on-policy refresh's batched path): each image as regenerate_region draws it (the
    same noise from its own rng; batched matmuls may move a pixel by one level), pixels away from the region's
    tokens untouched up to rounding."""
    from focusdpo.data.regenerate import regenerate_regions

    scenes = [world.sample_scene(np.random.default_rng(s), split="train", n_subjects=2) for s in (5, 6)]
    settings = RegenerateSettings(strength=0.8, steps=3, guidance=2.0)
    batched = regenerate_regions(backbone, [s.image for s in scenes], [s.masks[0] for s in scenes],
                                 [s.prompt for s in scenes], [s.references for s in scenes], settings,
                                 [np.random.default_rng(i) for i in range(2)])
    for i, s in enumerate(scenes):
        alone = regenerate_region(backbone, s.image, s.masks[0], s.prompt, s.references, settings,
                                  np.random.default_rng(i))
        assert np.abs(batched[i].astype(int) - alone.astype(int)).max() <= 1
        assert (batched[i] != s.image).any()
