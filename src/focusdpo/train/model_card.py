"""The model card (``README.md``) of a finished run and of its diffusers export (issue 18.5).

:func:`write_model_card` reads what the run folder holds (``config.yaml``, ``metrics.csv``, the newest
``val/samples-step-N.png``, ``dip.json``: the DIP set's ``card.json`` copied at the end of training) and writes
a Hugging Face model card through ``huggingface_hub.ModelCard``: YAML front matter (``library_name``, ``tags``,
``base_model`` when the base is a hub id, ``license``), then the base model, the method and objective, the data
card, the final metrics, the sample grid, a diffusers loading snippet for the backbone and the resolved config.
The trainer writes it into the run folder at the end; ``focusdpo export-lora`` writes it next to the export
(with the sample grid copied beside it, so the folder is complete on its own, e.g. for ``focusdpo push``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from focusdpo.backbones.lora_export import has_diffusers_pipeline, pipeline_snippet
from focusdpo.config import Config

CARD_NAME = "README.md"
DATA_CARD_NAME = "dip.json"  # the DIP set's card.json, kept with the run
SAMPLES_NAME = "samples.png"  # the sample grid copied next to an export
VALIDATION_NAME = "validation.png"  # the newest train.validation grid copied next to an export
# what the card reports of the last logged step (when the objective logs it)
FINAL_METRICS = ("loss", "implicit_acc", "margin", "err_w", "err_l", "a", "w_in_prior", "w_out_prior", "lr")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

_METHOD = {
    "focusdpo": "FocusDPO (Jin et al., arXiv 2509.01181): token-weighted Flow-DPO whose weights come from an "
                "adaptive focus (SPAF attention field + DPCE detail complexity, gated over timesteps)",
    "dpo": "Diffusion/Flow-DPO (uniform token weights)",
    "patchdpo": "PatchDPO-style patch-weighted regression (no reference model)",
    "sft": "supervised flow-matching fine-tuning on the positives",
}


def _base(cfg: Config) -> str:
    if cfg.model.checkpoint is None:
        return f"the built-in {cfg.model.backbone} base shipped with focusdpo"
    return str(cfg.model.checkpoint)


def _hub_id(cfg: Config) -> str | None:
    """``model.checkpoint`` when it is a hub id (not an existing local path), for ``base_model``."""
    ckpt = cfg.model.checkpoint
    if ckpt is None or Path(ckpt).expanduser().exists() or not _HUB_ID.fullmatch(ckpt):
        return None
    return ckpt


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last row of ``metrics.csv``: :data:`FINAL_METRICS` that are finite, plus ``step``."""
    from focusdpo.train.run_log import read_metrics

    try:
        rows = read_metrics(run_dir)
    except OSError:
        return {}
    if not rows:
        return {}
    last = rows[-1]
    return {"step": int(last["step"]), **{k: last[k] for k in FINAL_METRICS if math.isfinite(last.get(k, math.nan))}}


def newest_samples(run_dir: Path) -> Path | None:
    """The newest validation sample grid of the run (``val/samples-step-N.png``), if any."""
    grids = sorted((run_dir / "val").glob("samples-step-*.png"))
    return grids[-1] if grids else None


def newest_user_validation(run_dir: Path) -> Path | None:
    """The newest grid of the user's ``train.validation`` prompts (``validation/step-N.png``), if any."""
    grids = sorted((run_dir / "validation").glob("step-*.png"))
    return grids[-1] if grids else None


def _data_section(data_card: dict[str, Any] | None) -> str:
    if not data_card:
        return "No data card was found (the DIP set's `card.json`)."
    text = json.dumps(data_card, indent=1, sort_keys=True)
    return f"The DIP set's card (`{DATA_CARD_NAME}`):\n\n```json\n{text}\n```"


def card_text(cfg: Config, metrics: dict[str, float], data_card: dict[str, Any] | None, samples: str | None,
              where: str, user_grid: str | None = None) -> str:
    """The card's markdown body (no front matter). ``samples`` / ``user_grid``: the sample grid's and the
    ``train.validation`` grid's paths relative to the card; ``where``: what ``load_lora_weights`` is given."""
    t = cfg.train
    lines = [f"# {cfg.model.backbone} LoRA post-trained with {t.objective}", "",
             f"A LoRA (rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, on {', '.join(cfg.lora.targets)}) post-trained "
             f"with focusdpo for multi-subject personalized image generation.", "",
             "## Base model", "", f"- backbone: `{cfg.model.backbone}`", f"- weights: `{_base(cfg)}`"]
    imported = getattr(cfg.model.options, "lora_import", None)
    if imported:
        lines.append(f"- imported LoRA merged into the base before training: `{imported}`")
    method = _METHOD.get(t.objective, "an objective registered in focusdpo.objectives")
    lines += ["", "## Method", "", f"- objective: `{t.objective}`: {method}",
              f"- beta {cfg.loss.beta:g}, lambda_sft {cfg.loss.lambda_sft:g}, {t.max_steps} steps, lr {t.lr:g} "
              f"({t.schedule}, {t.warmup_steps} warm-up steps), batch {cfg.data.batch_size} x {t.grad_accum} "
              f"accumulation per process, seed {t.seed}"]
    if t.objective == "focusdpo":
        f = cfg.focus
        lines.append(f"- focus: readout `{f.readout}` at `{f.tap_layer}`, alpha_s {f.alpha_s:g}, "
                     f"alpha_a {f.alpha_a:g}, alpha_d {f.alpha_d:g}, tau {f.tau:g}, spaf {f.spaf}, dpce {f.dpce}, "
                     f"dynamic {f.dynamic}")
    lines += ["", "## Data", "", _data_section(data_card), "", "## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    else:
        lines.append("No metrics were logged.")
    lines += ["", "## Samples", ""]
    lines.append(f"References | positive | base | post-trained (validation records):\n\n![samples]({samples})"
                 if samples else "No validation grid was written.")
    if user_grid:
        prompts = "\n".join(f"{i + 1}. {v.prompt}" for i, v in enumerate(cfg.train.validation))
        lines += ["", f"Your validation prompts (`train.validation`; references | sample, a row each):\n\n{prompts}"
                      f"\n\n![validation]({user_grid})"]
    lines += ["", "## Use", "", pipeline_snippet(cfg.model, where), "", "## Config", "",
              "<details><summary>config.yaml (resolved)</summary>", "", "```yaml", cfg.to_yaml().rstrip(), "```",
              "", "</details>", ""]
    return "\n".join(lines)


def _card_data(cfg: Config) -> Any:
    from huggingface_hub import ModelCardData

    tags = ["focusdpo", "lora", "dpo", cfg.train.objective, cfg.model.backbone, "text-to-image",
            "subject-driven-generation"]
    diffusers = has_diffusers_pipeline(cfg.model)
    license_ = "other" if diffusers else "apache-2.0"  # a real base's terms apply to its LoRA; the tiny base is ours
    return ModelCardData(library_name="diffusers" if diffusers else "focusdpo",
                         tags=list(dict.fromkeys(tags)), base_model=_hub_id(cfg), license=license_)


def _place(grid: Path | None, run_dir: Path, out: Path, name: str) -> str | None:
    """``grid``'s path relative to the card in ``out``: inside the run folder as is, else copied as ``name``."""
    if grid is None:
        return None
    if out.resolve() == run_dir.resolve():
        return grid.relative_to(run_dir).as_posix()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid, out / name)
    return name


def write_model_card(run_dir: str | Path, out_dir: str | Path | None = None, load_from: str | None = None) -> Path:
    """Write ``README.md`` for the run in ``run_dir`` into ``out_dir`` (default: the run folder); returns it.

    Into another folder (an export), the sample grid is copied beside the card as ``samples.png`` (and the
    newest ``train.validation`` grid as ``validation.png``).
    ``load_from``: what the loading snippet passes to ``load_lora_weights`` (default: ``out_dir``; a hub repo id
    when the folder is pushed).
    """
    from huggingface_hub import ModelCard

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    cfg = Config.from_yaml((run_dir / "config.yaml").read_text())
    data_path = run_dir / DATA_CARD_NAME
    data_card = json.loads(data_path.read_text()) if data_path.is_file() else None
    samples = _place(newest_samples(run_dir), run_dir, out, SAMPLES_NAME)
    user_grid = _place(newest_user_validation(run_dir), run_dir, out, VALIDATION_NAME)
    body = card_text(cfg, final_metrics(run_dir), data_card, samples, load_from or str(out), user_grid)
    if has_diffusers_pipeline(cfg.model) and not (out / "pytorch_lora_weights.safetensors").is_file():
        first = f"## Use\n\nFirst write the diffusers file: `focusdpo export-lora {run_dir}`.\n"
        body = body.replace("## Use\n", first, 1)
    card = ModelCard(f"---\n{_card_data(cfg).to_yaml()}\n---\n\n{body}")
    out.mkdir(parents=True, exist_ok=True)
    card.save(out / CARD_NAME)
    return out / CARD_NAME
