"""Reports and plots: formatted tables with known numbers, paired gaps, grids that put each image where the
labels say, and PNG plots drawn from a metrics.csv with the trainer's columns."""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from focusdpo.eval.plots import plot_method_comparison, plot_training_curves, read_metrics_csv, smooth
from focusdpo.eval.report import comparison_grid, dreambench_markdown, fmt, paired_difference, toy_markdown


def _toy_metrics():
    def m(vals):
        return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)), "per_seed": vals}
    base = {"fidelity": m([0.5, 0.6, 0.7]), "leakage": m([0.3, 0.3, 0.3]), "prompt": m([0.9, 0.8, 0.7]),
            "by_subjects": {"2": {"fidelity": m([0.6, 0.7, 0.8]), "leakage": m([0.2] * 3), "prompt": m([1.0] * 3)},
                            "3": {"fidelity": m([0.4, 0.5, 0.6]), "leakage": m([0.4] * 3), "prompt": m([0.8] * 3)}},
            "n_scenes": 4, "seeds": [0, 1, 2], "samples_per_prompt": 1}
    run = {**base, "fidelity": m([0.6, 0.8, 0.7]), "leakage": m([0.2, 0.1, 0.3])}
    return {"base": base, "focusdpo": run}


def test_fmt_and_paired_difference_known_values():
    assert fmt({"mean": 0.81234, "std": 0.0105}) == "0.812 ± 0.011"
    assert fmt(0.5, digits=2) == "0.50" and fmt(None) == "-"
    d = paired_difference([0.6, 0.8, 0.7], [0.5, 0.6, 0.7])  # gaps 0.1, 0.2, 0.0
    assert d["mean"] == pytest.approx(0.1) and d["std"] == pytest.approx(math.sqrt(2 / 3) * 0.1)
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0])


def test_toy_markdown_tables():
    text = toy_markdown(_toy_metrics())
    assert "| base | 0.600 ± 0.100 | 0.300 ± 0.000 | 0.800 ± 0.100 |" in text
    assert "## 2 subjects" in text and "## 3 subjects" in text
    assert "| focusdpo | 0.100 ± 0.082 | -0.100 ± 0.082 | 0.000 ± 0.000 |" in text  # paired gaps to base


def test_dreambench_markdown_lists_each_method():
    summary = {"benchmark": "dreambench-multi", "n_images": 2, "dino": {"original": 0.5, "kosmos": 0.6},
               "clip_i": {"original": 0.7, "kosmos": 0.8}, "clip_t": 0.3,
               "per_group": {"cat+dog": dict.fromkeys(("dino_original", "dino_kosmos", "clip_i_original",
                                                       "clip_i_kosmos", "clip_t"), 0.25)},
               "per_subject": {}}
    text = dreambench_markdown({"uno": summary})
    assert "| uno | dreambench-multi | 2 | 0.500 | 0.600 | 0.700 | 0.800 | 0.300 |" in text
    assert "| cat+dog | 0.250 |" in text


def test_comparison_grid_places_images_under_their_labels(tmp_path):
    refs = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)]
    red, green = torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    red[:, 0], green[:, 1] = 1.0, 1.0
    img = comparison_grid(refs, {"base": red, "focusdpo": green}, tmp_path / "g.png", scale=2, pad=2)
    again = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(again, np.asarray(img))
    # unscaled layout: pad 2, ref 8, pad, ref 8, pad, base 16 at x=22, pad, focusdpo 16 at x=40; rows of 16 + pad
    header = 14
    for row in range(2):
        y = header + 2 * (2 + row * 18 + 8)
        assert tuple(again[y, 2 * 30]) == (255, 0, 0)
        assert tuple(again[y, 2 * 48]) == (0, 255, 0)
        assert tuple(again[y, 2 * 6]) == (255, 255, 255)  # references are 8 px tall, top-aligned
        assert tuple(again[y - 2 * 6, 2 * 6]) == (0, 0, 0)
    assert again.shape == (header + 2 * (2 * 18 + 2), 2 * (2 + 8 + 2 + 8 + 2 + 16 + 2 + 16 + 2), 3)


def test_smooth_is_a_trailing_mean_that_skips_nan():
    v = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    assert np.allclose(smooth(v, 2)[[0, 1, 3, 4]], [1.0, 2.0, 5.0, 6.0]) and np.isnan(smooth(v, 2)[2])


def _write_csv(path, columns, n=30):
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for s in range(1, n + 1):
            w.writerow([s] + ["" if c == "a" and s % 2 else f"{rng.random():.4f}" for c in columns[1:]])


def test_training_curves_from_trainer_columns(tmp_path):
    cols = ["step", "loss", "implicit_acc", "margin", "err_w", "err_l", "ref_err_w", "ref_err_l", "w_in_prior",
            "w_out_prior", "a", "gate", "lr"]
    _write_csv(tmp_path / "metrics.csv", cols)
    data = read_metrics_csv(tmp_path / "metrics.csv")
    assert data["step"][-1] == 30 and np.isnan(data["a"][0]) and np.isfinite(data["a"][1])
    panels = plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", title="run")
    assert panels == ["loss", "implicit accuracy", "reward margin", "errors", "focus: alignment and gate",
                      "focus: mean weight"]
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300
    _write_csv(tmp_path / "sft.csv", ["step", "loss", "err_w"])  # an objective without DPO metrics
    assert plot_training_curves(tmp_path / "sft.csv", tmp_path / "sft.png") == ["loss", "errors"]
    _write_csv(tmp_path / "bad.csv", ["step", "lr"])
    with pytest.raises(ValueError, match="step, loss"):
        plot_training_curves(tmp_path / "bad.csv", tmp_path / "bad.png")


def test_method_comparison_plot(tmp_path):
    names = plot_method_comparison(_toy_metrics(), tmp_path / "cmp.png")
    assert names == ["fidelity", "leakage", "prompt"]
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="empty"):
        plot_method_comparison({}, tmp_path / "x.png")
