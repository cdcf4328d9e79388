"""Disruptions: confined to M_prior, change the inside, reproducible, registry behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from focusdpo.data import disruptions as D

BUILTIN = ["attribute_swap", "cross_paste", "detail_erase", "patch_shuffle"]


def _swap_hook(image: np.ndarray, regions: np.ndarray):
    """A stand-in for the world's identity swap: the subject re-coloured (what matters is confinement)."""
    def hook(target: int, rng: np.random.Generator):
        return (255 - image).astype(np.uint8), {"new_identity": 7}
    return hook


@pytest.mark.parametrize("name", BUILTIN + ["identity_swap"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outside_identical_inside_changed(scene, name, seed):
    img, regions = scene
    ctx = D.DisruptionContext(swap_identity=_swap_hook(img, regions))
    res = D.apply_disruption(name, img, regions, np.random.default_rng(seed), ctx)
    assert res.negative.dtype == np.uint8 and res.negative.shape == img.shape
    assert np.array_equal(res.m_prior, regions[res.subjects].any(0))
    outside = ~res.m_prior
    assert np.array_equal(res.negative[outside], img[outside])
    inside_diff = (res.negative != img).any(-1) & res.m_prior
    assert inside_diff.sum() > 0 and res.changed == pytest.approx(inside_diff.sum() / res.m_prior.sum())


def test_attribute_swap_takes_source_statistics(scene):
    img, regions = scene
    res = D.apply_disruption("attribute_swap", img, regions, np.random.default_rng(0), D.DisruptionContext(),
                             target=0)
    src = res.params["source"]
    assert src != 0
    got = res.negative[regions[0]].astype(float).mean(0)
    want = img[regions[src]].astype(float).mean(0)
    np.testing.assert_allclose(got, want, atol=2.0)


def test_patch_shuffle_is_a_permutation_of_the_box(scene):
    img, regions = scene
    res = D.apply_disruption("patch_shuffle", img, regions, np.random.default_rng(3), D.DisruptionContext(),
                             target=1)
    gh, gw = res.params["grid"]
    ch, cw = res.params["cell"]
    rows = np.flatnonzero(regions[1].any(1))
    cols = np.flatnonzero(regions[1].any(0))
    top, left = rows[0], cols[0]

    def cells(im):
        return sorted(im[top + r * ch:top + (r + 1) * ch, left + c * cw:left + (c + 1) * cw].tobytes()
                      for r in range(gh) for c in range(gw))

    # Rebuild the un-masked proposal and check it holds exactly the same cells.
    prop, _ = D.patch_shuffle(img, regions, 1, np.random.default_rng(3), D.DisruptionContext())
    assert cells(prop) == cells(img) and not np.array_equal(prop, img)


def test_deterministic_for_a_seed(scene):
    img, regions = scene
    for name in BUILTIN:
        a = D.apply_disruption(name, img, regions, np.random.default_rng(5), D.DisruptionContext())
        b = D.apply_disruption(name, img, regions, np.random.default_rng(5), D.DisruptionContext())
        assert np.array_equal(a.negative, b.negative) and a.params == b.params


def test_two_subject_disruptions_not_drawn_for_one_subject():
    mix = {"attribute_swap": 5.0, "cross_paste": 5.0, "detail_erase": 1.0, "identity_swap": 3.0}
    ctx = D.DisruptionContext()
    assert D.applicable(mix, 1, ctx) == {"detail_erase": 1.0}
    rng = np.random.default_rng(0)
    assert {D.draw_disruption(mix, 1, ctx, rng) for _ in range(50)} == {"detail_erase"}
    assert D.applicable(mix, 2, ctx).keys() == {"attribute_swap", "cross_paste", "detail_erase"}
    with pytest.raises(D.DisruptionError, match="detail_erase"):
        D.draw_disruption({"attribute_swap": 1.0}, 1, ctx, rng)
    with pytest.raises(D.DisruptionError, match="needs 2 subjects"):
        D.apply_disruption("cross_paste", np.zeros((8, 8, 3), np.uint8), np.ones((1, 8, 8), bool), rng, ctx)


def test_draw_follows_the_mix():
    mix = {"detail_erase": 3.0, "patch_shuffle": 1.0}
    rng = np.random.default_rng(0)
    names = [D.draw_disruption(mix, 2, D.DisruptionContext(), rng) for _ in range(4000)]
    assert abs(names.count("detail_erase") / 4000 - 0.75) < 0.03


def test_registry_plugin_and_errors(scene):
    img, regions = scene
    # a name nobody registers (regenerate may already be registered by the backbone package in this process)
    with pytest.raises(D.DisruptionError, match="not registered"):
        D.check_mix({"melt": 1.0})

    def fake_regen(image, regions, target, rng, ctx):
        return (image // 2).astype(np.uint8), {"steps": ctx.extras["backbone"]}

    D.register_disruption("fake_regen", fake_regen, needs=("backbone",))
    try:
        with pytest.raises(D.DisruptionError, match="already registered"):
            D.register_disruption("fake_regen", fake_regen)
        assert D.applicable({"fake_regen": 1.0}, 2, D.DisruptionContext()) == {}
        ctx = D.DisruptionContext(extras={"backbone": 4})
        assert D.draw_disruption({"fake_regen": 1.0}, 2, ctx, np.random.default_rng(0)) == "fake_regen"
        res = D.apply_disruption("fake_regen", img, regions, np.random.default_rng(0), ctx)
        assert res.params == {"steps": 4}
        assert np.array_equal(res.negative[~res.m_prior], img[~res.m_prior])
        assert D.check_mix({"fake_regen": 1.0, "detail_erase": 3.0}) == {"fake_regen": 0.25, "detail_erase": 0.75}
    finally:
        D._REGISTRY.pop("fake_regen")


def test_bad_plugin_output_is_rejected(scene):
    img, regions = scene
    D.register_disruption("bad", lambda *a: (np.zeros((4, 4, 3), np.uint8), {}))
    try:
        with pytest.raises(D.DisruptionError, match="must return uint8"):
            D.apply_disruption("bad", img, regions, np.random.default_rng(0), D.DisruptionContext())
    finally:
        D._REGISTRY.pop("bad")
