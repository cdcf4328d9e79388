"""DreamBench scoring with tiny random DINO/CLIP models saved locally and loaded back through `load_scorer`.

The real reference photos stand in for generated images: an image that *is* a subject's fixed (kosmos)
reference scores exactly 1 against it, and the test recomputes pairing and averaging on its own (embeddings
one image at a time, plain loops over the protocol) to check the library's batched, grouped computation.
"""

import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from focusdpo.eval.dreambench import (
    DreamBenchError,
    image_name,
    index_generated,
    load_scorer,
    preprocess,
    score_generated,
    summarize,
)
from focusdpo.eval.dreambench_data import Entry, load_entries, subject_images
from shared_data import DREAMBENCH as SHARED
from shared_data import needs_dreambench as needs_shared


def _save_tiny_models(root: Path) -> tuple[str, str]:
    """A 1-layer DINO-like ViT and a 1-layer CLIP with a character-level tokenizer, saved with save_pretrained
    (built the same way on transformers 4.x, the floor, and 5.x)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    dino.save_pretrained(root / "dino")
    chars = list(string.ascii_lowercase + string.digits + "'-.,")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (root / "clip").mkdir()  # vocab.json + merges.txt: the one tokenizer input transformers 4.x and 5.x both read
    (root / "clip" / "vocab.json").write_text(json.dumps(vocab))
    (root / "clip" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(root / "clip")
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 16,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"]}
    vision = {"image_size": 224, "patch_size": 32, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 16}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return str(root / "dino"), str(root / "clip")


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    dino, clip = _save_tiny_models(tmp_path_factory.mktemp("scorers"))
    return load_scorer(dino, clip, device="cpu", batch_size=3)


def test_preprocess_known_values():
    grey = Image.new("RGB", (100, 60), (128, 64, 255))
    x = preprocess([grey], "dino", 224)
    assert x.shape == (1, 3, 224, 224)
    expected = (torch.tensor([128, 64, 255]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    assert torch.allclose(x[0].mean(dim=(1, 2)), expected, atol=1e-3)
    # 448x224, black left half: resize -> 512x256, center crop x in [144, 368): the edge lands at column 112.
    half = np.zeros((224, 448, 3), np.uint8)
    half[:, 224:] = 255
    x = preprocess([Image.fromarray(half)], "dino", 224)
    assert torch.all(x[0, 0, :, :100] < -2.0) and torch.all(x[0, 0, :, 124:] > 2.0)
    c = preprocess([Image.fromarray(half)], "clip", 224)  # resize 224 keeps 448x224; crop [112, 336): edge at 112
    assert torch.all(c[0, 0, :, :108] < -1.7) and torch.all(c[0, 0, :, 116:] > 1.9)
    with pytest.raises(ValueError, match="kind='sd'"):
        preprocess([grey], "sd", 224)


def test_loader_names_a_bad_model_path(tmp_path):
    with pytest.raises(DreamBenchError, match="eval.dino_model="):
        load_scorer(str(tmp_path / "nothing"), str(tmp_path / "nothing"))


def test_index_generated_names_and_errors(tmp_path):
    refs = (Path("a.jpg"),)
    entries = [Entry(0, "a cat", ("cat",), refs), Entry(1, "a dog", ("dog",), refs),
               Entry(2, "a cat and a dog", ("cat", "grey_sloth_plushie"), refs * 2)]
    folder = tmp_path / "gen"
    folder.mkdir()
    for e, seed in ((entries[0], 3407), (entries[2], 5)):
        (folder / image_name(e, seed)).write_bytes(b"")
    (folder / "1_4.png").write_bytes(b"")  # UNO's <index>_<j>.png
    (folder / "1_4.json").write_text("{}")  # UNO's sidecar: ignored
    got = index_generated(folder, entries)
    assert [(g.path.name, g.entry.index, g.sample) for g in got] == [
        ("000_cat_3407.png", 0, 3407), ("1_4.png", 1, 4), ("002_cat+grey_sloth_plushie_5.png", 2, 5)]
    (folder / "1_4.png").unlink()
    with pytest.raises(DreamBenchError, match=r"1 of 3 entries have no image .*\[1\]"):
        index_generated(folder, entries)
    assert len(index_generated(folder, entries, allow_partial=True)) == 2
    (folder / "001_cat_0.png").write_bytes(b"")
    with pytest.raises(DreamBenchError, match="001_cat_0.png: subjects 'cat' do not match entry 1"):
        index_generated(folder, entries)
    (folder / "001_cat_0.png").rename(folder / "007_cat_0.png")
    with pytest.raises(DreamBenchError, match="index 7 is past"):
        index_generated(folder, entries)
    (folder / "007_cat_0.png").rename(folder / "final.png")
    with pytest.raises(DreamBenchError, match="final.png: not a generated-image name"):
        index_generated(folder, entries)


def _copy_as_png(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im.convert("RGB").save(dst)


def _expected(scorer, generated, data_dir):
    """Protocol averaging recomputed with per-image embeddings and plain loops."""
    cache: dict = {}

    def emb(path, kind):
        if (path, kind) not in cache:
            cache[path, kind] = (scorer.embed_dino if kind == "dino" else scorer.embed_clip_images)([path])[0]
        return cache[path, kind]

    def cos(a, b, kind):
        return float(emb(a, kind) @ emb(b, kind))
    groups: dict = {}
    for g in generated:
        per_slot = {"dino_original": [], "dino_kosmos": [], "clip_i_original": [], "clip_i_kosmos": []}
        for s, fixed in zip(g.entry.subjects, g.entry.references, strict=True):
            for kind, key in (("dino", "dino"), ("clip", "clip_i")):
                per_slot[f"{key}_kosmos"].append(cos(g.path, fixed, kind))
                every = subject_images(data_dir, s)
                per_slot[f"{key}_original"].append(np.mean([cos(g.path, r, kind) for r in every]))
        image = {k: np.mean(v) for k, v in per_slot.items()}
        image["clip_t"] = float(emb(g.path, "clip") @ scorer.embed_clip_texts([g.entry.prompt])[0])
        groups.setdefault(g.entry.subjects, []).append(image)
    keys = next(iter(groups.values()))[0]
    return {k: np.mean([np.mean([im[k] for im in ims]) for ims in groups.values()]) for k in keys}


@needs_shared
def test_single_subject_pairing_and_averaging(scorer, tmp_path):
    entries = load_entries(SHARED, "dreambench-single")
    chosen = [entries[0], entries[1], entries[25]]  # backpack x2, backpack_dog x1: unequal group sizes
    folder = tmp_path / "gen"
    folder.mkdir()
    for e in chosen:
        _copy_as_png(e.references[0], folder / image_name(e, 0))  # the fixed reference itself
        other = next(p for p in subject_images(SHARED, e.subjects[0]) if p != e.references[0])
        _copy_as_png(other, folder / image_name(e, 1))
    generated = index_generated(folder, entries, allow_partial=True)
    rows = score_generated(generated, SHARED, scorer)
    assert len(rows) == 6
    for r in rows:
        if r["sample"] == 0:  # planted: the generated image is the kosmos reference
            assert r["dino_kosmos"] == pytest.approx(1.0, abs=1e-5)
            assert r["clip_i_kosmos"] == pytest.approx(1.0, abs=1e-5)
        else:
            assert r["dino_kosmos"] < 0.99999
    summary = summarize(rows)
    expected = _expected(scorer, generated, SHARED)
    assert summary["n_groups"] == 2 and summary["n_images"] == 6 and summary["n_entries"] == 3
    for key, value in expected.items():
        metric, _, setting = key.rpartition("_") if key != "clip_t" else ("clip_t", "", "")
        got = summary["clip_t"] if key == "clip_t" else summary[metric][setting]
        assert got == pytest.approx(value, abs=1e-5), key


@needs_shared
def test_multi_subject_scores_each_subject_separately(scorer, tmp_path):
    entries = load_entries(SHARED, "dreambench-multi")
    e = entries[0]  # backpack_dog + bear_plushie
    folder = tmp_path / "gen"
    folder.mkdir()
    _copy_as_png(e.references[0], folder / image_name(e, 0))
    _copy_as_png(e.references[1], folder / image_name(e, 1))
    generated = index_generated(folder, entries, allow_partial=True)
    rows = score_generated(generated, SHARED, scorer)
    assert [(r["sample"], r["slot"], r["subject"]) for r in rows] == [
        (0, 0, "backpack_dog"), (0, 1, "bear_plushie"), (1, 0, "backpack_dog"), (1, 1, "bear_plushie")]
    assert rows[0]["dino_kosmos"] == pytest.approx(1.0, abs=1e-5) and rows[1]["dino_kosmos"] < 0.99999
    assert rows[3]["dino_kosmos"] == pytest.approx(1.0, abs=1e-5) and rows[2]["dino_kosmos"] < 0.99999
    assert rows[0]["clip_t"] == rows[1]["clip_t"]  # CLIP-T is per image
    summary = summarize(rows)
    expected = _expected(scorer, generated, SHARED)
    assert summary["dino"]["kosmos"] == pytest.approx(expected["dino_kosmos"], abs=1e-5)
    assert summary["clip_i"]["original"] == pytest.approx(expected["clip_i_original"], abs=1e-5)
    per_subject = summary["per_subject"]["bear_plushie"]["dino_kosmos"]
    assert per_subject == pytest.approx((rows[1]["dino_kosmos"] + rows[3]["dino_kosmos"]) / 2, abs=1e-6)


@needs_shared
def test_eval_command_writes_metrics_and_report(scorer, tmp_path):
    from typer.testing import CliRunner

    from focusdpo.cli import app

    entries = load_entries(SHARED, "dreambench-single")
    folder = tmp_path / "mymethod"
    folder.mkdir()
    _copy_as_png(entries[3].references[0], folder / image_name(entries[3], 0))
    models = tmp_path / "models"
    dino, clip = _save_tiny_models(models)
    out = tmp_path / "out"
    args = ["eval", "--benchmark", "dreambench-single", "--images", str(folder), "--data", str(SHARED),
            "--out", str(out), "--allow-partial", f"eval.dino_model={dino}", f"eval.clip_model={clip}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["mymethod"] and metrics["mymethod"]["n_images"] == 1
    assert metrics["mymethod"]["dino"]["kosmos"] == pytest.approx(1.0, abs=1e-5)
    assert "| mymethod | dreambench-single | 1 |" in (out / "report.md").read_text()
    assert (out / "scores.csv").read_text().count("\n") == 2
    shutil.rmtree(models)


class _OldOrNewClip(torch.nn.Module):
    """A CLIPModel whose get_*_features return one API shape: ``tensor`` (transformers 4.x, the floor) or
    ``output`` (5.x: a BaseModelOutputWithPooling with the projected embedding in pooler_output)."""

    def __init__(self, clip, shape: str) -> None:
        super().__init__()
        self.clip, self.shape, self.config = clip, shape, clip.config

    def _wrap(self, x: torch.Tensor):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return x if self.shape == "tensor" else BaseModelOutputWithPooling(pooler_output=x)

    def get_image_features(self, pixel_values):
        return self._wrap(self.clip.visual_projection(self.clip.vision_model(pixel_values=pixel_values).pooler_output))

    def get_text_features(self, input_ids, attention_mask=None):
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self._wrap(self.clip.text_projection(out.pooler_output))


def test_clip_embeddings_on_both_transformers_api_shapes(scorer) -> None:
    """CLIP-I/CLIP-T read the projected embedding whether get_*_features returns a tensor (4.x) or an output
    object (5.x); all equal the installed CLIPModel's own, which is one of the two shapes."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
    texts = ["a photo of a dog", "a red backpack on a table"]
    installed = scorer.embed_clip_images(images), scorer.embed_clip_texts(texts)
    assert installed[0].shape == (2, 16) and installed[1].shape == (2, 16)
    for shape in ("tensor", "output"):
        other = replace(scorer, clip=_OldOrNewClip(scorer.clip, shape))
        torch.testing.assert_close(other.embed_clip_images(images), installed[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.embed_clip_texts(texts), installed[1], rtol=1e-5, atol=1e-6)
