"""FLUX VAE codec: packing layout, latent normalisation, from_pretrained round trip, offload, latent cache."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline

from flux_tiny import tiny_flux_components
from focusdpo.backbones.base import Codec
from focusdpo.backbones.vae import FluxVAECodec, LatentCache, pack_latents, unpack_latents


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return tiny_flux_components(seed=0)["vae"]


def test_pack_matches_flux_pipeline_and_round_trips() -> None:
    z = torch.randn(2, 16, 6, 4)
    packed = pack_latents(z)
    assert packed.shape == (2, 6, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 4))
    # channel order (c, dy, dx): token (0, 0), channel 4c + 2dy + dx is latent pixel (dy, dx) of channel c
    assert packed[0, 0, 4 * 3 + 2 * 1 + 0] == z[0, 3, 1, 0]
    assert torch.equal(unpack_latents(packed, (3, 2)), z)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 3, 4))
    with pytest.raises(ValueError, match="grid"):
        unpack_latents(packed, (2, 2))


def test_encode_is_normalised_packed_posterior_mode(vae: AutoencoderKL) -> None:
    codec = FluxVAECodec(vae)
    assert isinstance(codec, Codec)
    assert (codec.patch, codec.channels) == (16, 64)
    images = torch.rand(2, 3, 32, 48)
    toks = codec.encode(images)
    assert toks.grid == (2, 3) and toks.tokens.shape == (2, 6, 64)
    with torch.no_grad():
        mean = vae.encode(images * 2 - 1).latent_dist.mean
    want = FluxPipeline._pack_latents((mean - 0.1159) * 0.3611, 2, 16, 4, 6)
    torch.testing.assert_close(toks.tokens, want)


def test_decode_inverts_the_normalisation(vae: AutoencoderKL) -> None:
    codec = FluxVAECodec(vae)
    tokens = torch.randn(1, 4, 64)
    with torch.no_grad():
        z = unpack_latents(tokens, (2, 2)) / 0.3611 + 0.1159
        want = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
    out = codec.decode(tokens, (2, 2))
    assert out.shape == (1, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(out, want)


def test_bad_sizes_name_the_fix(vae: AutoencoderKL) -> None:
    codec = FluxVAECodec(vae)
    with pytest.raises(ValueError, match="multiple of the VAE token size 16"):
        codec.encode(torch.rand(1, 3, 24, 32))
    with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
        codec.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="expected"):
        codec.decode(torch.randn(1, 4, 32), (2, 2))


def test_from_pretrained_round_trip(vae: AutoencoderKL, tmp_path) -> None:
    vae.save_pretrained(tmp_path / "vae")
    loaded = FluxVAECodec.from_pretrained(str(tmp_path), subfolder="vae")
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode(images).tokens, FluxVAECodec(vae).encode(images).tokens)
    assert loaded.fingerprint() == FluxVAECodec(vae).fingerprint()


def test_offload_moves_the_vae_to_the_device_only_for_the_call(vae: AutoencoderKL, monkeypatch) -> None:
    images = torch.rand(1, 3, 32, 32)
    offloaded = FluxVAECodec(vae, device="cpu", offload=True)
    events: list[str] = []
    real_to = vae.to
    monkeypatch.setattr(vae, "to", lambda *a, **k: (events.append(f"to {a[0]}"), real_to(*a, **k))[1],
                        raising=False)
    handle = vae.encoder.register_forward_pre_hook(lambda m, a: events.append("forward"))
    try:
        out = offloaded.encode(images)
    finally:
        handle.remove()
    assert events == ["to cpu", "forward", "to cpu"]  # execution device (here the CPU), run, back to the CPU
    torch.testing.assert_close(out.tokens, FluxVAECodec(vae).encode(images).tokens)


def test_latent_cache_hits_return_the_encoded_latents(vae: AutoencoderKL, tmp_path) -> None:
    codec = FluxVAECodec(vae)
    cache = LatentCache(codec, tmp_path / "latents")
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    first = cache.encode(torch.cat([a, b]))
    assert (cache.hits, cache.misses) == (0, 2)
    again = cache.encode(torch.cat([b, a, a]))  # order and duplicates follow the batch
    assert (cache.hits, cache.misses) == (3, 2)
    torch.testing.assert_close(again.tokens, first.tokens[[1, 0, 0]], rtol=0, atol=0)
    torch.testing.assert_close(first.tokens, codec.encode(torch.cat([a, b])).tokens)
    # a fresh cache object over the same folder (the next run) reads the files
    cache2 = LatentCache(codec, tmp_path / "latents")
    cache2.encode(a)
    assert (cache2.hits, cache2.misses) == (1, 0)


def test_latent_cache_is_keyed_by_vae_weights(vae: AutoencoderKL, tmp_path) -> None:
    other = tiny_flux_components(seed=1)["vae"]
    c1, c2 = LatentCache(FluxVAECodec(vae), tmp_path), LatentCache(FluxVAECodec(other), tmp_path)
    assert c1.dir != c2.dir
    img = torch.rand(1, 3, 32, 32)
    c1.encode(img)
    out = c2.encode(img)
    assert c2.misses == 1
    assert not torch.allclose(out.tokens, c1.encode(img).tokens)
