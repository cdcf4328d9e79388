"""T5 + CLIP text encoder: offline tokenizers, the FluxPipeline's own conditioning, limits, offload."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from flux_tiny import tiny_flux_components
from focusdpo.backbones.base import TextEncoder
from focusdpo.backbones.flux_text import FluxTextEncoder, TextCache

PROMPTS = ["a photo of a red dog and a blue cat", "a striped toy on the grass"]


@pytest.fixture(scope="module")
def parts() -> dict:
    return tiny_flux_components(seed=0)


def _encoder(parts: dict, max_tokens: int = 16, **kw) -> FluxTextEncoder:
    return FluxTextEncoder(parts["text_encoder_2"], parts["tokenizer_2"], parts["text_encoder"], parts["tokenizer"],
                           max_tokens=max_tokens, **kw)


def test_tokenizers_are_built_offline_and_tokenize_words(parts: dict) -> None:
    t5 = parts["tokenizer_2"]
    ids = t5("a red dog").input_ids
    assert ids[-1] == 1 and len(ids) == 4  # three whole-word pieces + </s>
    assert t5.convert_ids_to_tokens(ids) == ["\u2581a", "\u2581red", "\u2581dog", "</s>"]
    clip = parts["tokenizer"]
    assert clip.convert_ids_to_tokens(clip("Dog").input_ids) == ["<|startoftext|>", "d", "o", "g</w>", "<|endoftext|>"]
    assert clip.model_max_length == 77


def test_encode_equals_the_flux_pipeline_conditioning(parts: dict) -> None:
    enc = _encoder(parts)
    assert isinstance(enc, TextEncoder)
    assert (enc.dim, enc.pooled_dim) == (32, 32)
    cond = enc.encode(PROMPTS)
    assert cond.tokens.shape == (2, 16, 32) and cond.pooled.shape == (2, 32)
    pipe = FluxPipeline(**parts)
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(cond.tokens, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    # the pooled vector depends on the prompt (CLIP's EOS position), the tokens on every word
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])


def test_too_long_prompt_raises_with_the_fix(parts: dict) -> None:
    enc = _encoder(parts, max_tokens=4)
    with pytest.raises(ValueError, match=r"more than model.max_text_tokens=4"):
        enc.encode(["a photo of a red dog"])
    assert enc.encode(["a red dog"]).tokens.shape == (1, 4, 32)  # exactly fits: 3 words + </s>


def test_bad_prompt_arguments(parts: dict) -> None:
    enc = _encoder(parts)
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode("a red dog")
    with pytest.raises(ValueError, match="max_tokens"):
        _encoder(parts, max_tokens=0)


def test_from_pretrained_round_trip_and_offload(parts: dict, tmp_path) -> None:
    FluxPipeline(**parts).save_pretrained(tmp_path)
    loaded = FluxTextEncoder.from_pretrained(str(tmp_path), max_tokens=16, offload=True)
    want = _encoder(parts).encode(PROMPTS)
    got = loaded.encode(PROMPTS)
    torch.testing.assert_close(got.tokens, want.tokens)
    torch.testing.assert_close(got.pooled, want.pooled)
    assert next(loaded.t5.parameters()).device.type == "cpu" and not loaded.t5.training
    assert not any(p.requires_grad for p in loaded.clip.parameters())


def test_clip_tokenizer_in_flux_dev_layout(parts: dict, tmp_path) -> None:
    """FLUX.1-dev ships ``tokenizer/`` as vocab.json + merges.txt (no tokenizer.json): it must load the same."""
    import json
    import shutil

    FluxPipeline(**parts).save_pretrained(tmp_path)
    folder = tmp_path / "tokenizer"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(parts["tokenizer"].get_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    loaded = FluxTextEncoder.from_pretrained(str(tmp_path), max_tokens=16)
    assert torch.equal(loaded.clip_ids(PROMPTS), _encoder(parts).clip_ids(PROMPTS))
    torch.testing.assert_close(loaded.encode(PROMPTS).pooled, _encoder(parts).encode(PROMPTS).pooled)


def test_text_cache_returns_the_encoders_features_by_prompt(parts: dict, tmp_path) -> None:
    enc = _encoder(parts)
    cache = TextCache(enc, tmp_path)
    assert isinstance(cache, TextEncoder) and (cache.dim, cache.pooled_dim) == (32, 32)
    first = cache.encode(PROMPTS)
    assert (cache.hits, cache.misses) == (0, 2)
    again = cache.encode([PROMPTS[1], PROMPTS[0], PROMPTS[1]])  # order and repeats follow the batch
    assert (cache.hits, cache.misses) == (3, 2)
    want = enc.encode(PROMPTS)
    torch.testing.assert_close(first.tokens, want.tokens)
    torch.testing.assert_close(again.pooled, want.pooled[[1, 0, 1]], rtol=0, atol=0)
    # the next run reads the files; another max_tokens (other features) gets its own folder
    assert TextCache(enc, tmp_path).encode(PROMPTS[:1]) is not None
    assert TextCache(_encoder(parts, max_tokens=12), tmp_path).dir != cache.dir
    fresh = TextCache(enc, tmp_path)
    fresh.encode(PROMPTS)
    assert (fresh.hits, fresh.misses) == (2, 0)
