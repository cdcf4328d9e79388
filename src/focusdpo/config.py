"""Configuration: one dataclass per concern, loaded from YAML with ``key.sub=value`` overrides.

Every field carries its help text in ``metadata["help"]``. ``__post_init__`` of each dataclass rejects
bad values with a :class:`ConfigError` that names the field, the value and what is allowed, so a bad
command line fails before any work starts. The resolved :class:`Config` dumps to YAML and loads back
identically (``Config.from_yaml(cfg.to_yaml()) == cfg``).

Checked for every field at load (issue 15): floats are finite (``.inf``/``.nan`` are refused), seeds (fields
named ``seed``, ``*_seed``, ``seeds``) lie in [0, 2**32), a YAML mapping may not repeat a key, and an
unreadable or malformed file or override is named with the place of the problem.

Usage::

    cfg = load_config("configs/toy.yaml", ["train.max_steps=50", "focus.spaf=false"])
    cfg.save(run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

OBJECTIVES = ("sft", "dpo", "patchdpo", "focusdpo")
DISRUPTIONS = ("attribute_swap", "cross_paste", "detail_erase", "patch_shuffle", "identity_swap", "regenerate")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def _choice(name: str, value: Any, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    _check(value in choices, name, value, "one of " + ", ".join(choices))


@dataclass
class WorldConfig:
    """The built-in synthetic world (DESIGN section 4)."""

    seed: int = _f(0, "Seed of the world: identities and the train/held-out split.")
    n_identities: int = _f(600, "Number of procedural identities (>= 500 recommended).")
    heldout_fraction: float = _f(0.2, "Fraction of identities kept for evaluation only, in (0, 1).")
    scene_size: int = _f(32, "Side of a scene (target) image in pixels.")
    ref_size: int = _f(16, "Side of a reference image in pixels.")
    min_subjects: int = _f(2, "Fewest subjects in a scene.")
    max_subjects: int = _f(3, "Most subjects in a scene.")
    share_prob: float = _f(0.3, "Probability that each further subject of a scene shares the class or the body-"
                                "colour family of an earlier one (makes leakage possible), in [0, 1].")

    def __post_init__(self) -> None:
        _check(self.n_identities >= 20, "world.n_identities", self.n_identities, ">= 20")
        _check(0 < self.heldout_fraction < 1, "world.heldout_fraction", self.heldout_fraction, "in (0, 1)")
        _check(self.scene_size >= 16 and self.scene_size % 8 == 0, "world.scene_size", self.scene_size,
               "a multiple of 8, >= 16")
        _check(self.ref_size >= 8 and self.ref_size % 8 == 0, "world.ref_size", self.ref_size,
               "a multiple of 8, >= 8")
        _check(1 <= self.min_subjects <= self.max_subjects <= 3, "world.min_subjects/max_subjects",
               (self.min_subjects, self.max_subjects), "1 <= min <= max <= 3")
        _check(0 <= self.share_prob <= 1, "world.share_prob", self.share_prob, "in [0, 1]")


@dataclass
class DataConfig:
    """DIP data: where it comes from, how it is built and loaded (DESIGN 2.7)."""

    path: str | None = _f(None, "Folder of a built DIP set (Parquet shards + card.json). None: build or "
                                "reuse the cached toy set described by the other fields.")
    n_records: int = _f(2000, "Records in the toy DIP set built when `path` is None.")
    seed: int = _f(0, "Seed of the toy DIP build.")
    disruptions: dict[str, float] = _f(
        {"attribute_swap": 0.4, "cross_paste": 0.15, "detail_erase": 0.2, "patch_shuffle": 0.1,
         "identity_swap": 0.15},
        "Disruption mix: name -> relative weight (normalised). Names: " + ", ".join(DISRUPTIONS) + ".")
    batch_size: int = _f(8, "Pairs per batch per process.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    cache_dir: str = _f("~/.cache/focusdpo", "Where the toy DIP set built on demand is cached.")
    shard_records: int = _f(1000, "Records per Parquet shard of a DIP build.")
    max_pixels: int = _f(4096 * 4096, "Largest image (width x height) a manifest build accepts; bigger ones are "
                                      "rejected (also guards against decompression bombs).")
    mask_backend: str = _f("auto", "`dip build --auto-masks`: models (the detector + segmenter below; must load), "
                                   "grabcut (OpenCV, CPU) or auto (the models when they load, else GrabCut with "
                                   "the reason printed; GrabCut also for a record the models cannot mask).")
    mask_detector: str = _f("google/owlv2-base-patch16-ensemble",
                            "--auto-masks: open-vocabulary detector queried with each subject's class words "
                            "(OWL-ViT or OWLv2; local folder or hub id, from the cache unless downloadable).")
    mask_segmenter: str = _f("facebook/sam-vit-base", "--auto-masks: box-prompted segmenter (SAM; local folder or "
                                                      "hub id).")
    mask_device: str = _f("cpu", "--auto-masks: device of the detector and segmenter (cpu, cuda, cuda:1, ...).")
    mask_min_score: float = _f(0.1, "--auto-masks: smallest detector score (sigmoid, in [0, 1]) that counts as "
                                    "finding a subject.")
    refresh_every: int = _f(0, "On-policy DIP (issue 16): every N optimizer steps (from step 0) the current policy "
                               "regenerates subject regions of data.refresh_n records; 0: off.")
    refresh_n: int = _f(32, "On-policy DIP: training records whose subject region the policy regenerates per round.")
    refresh_mix: float = _f(0.5, "On-policy DIP: share of each global batch taken from the newest round's kept "
                                 "pairs (same subject count and sizes), in [0, 1].")
    refresh_judge: str = _f("toy", "On-policy DIP: who keeps a regenerated pair: toy (the world's ground truth: "
                                   "the negative loses fidelity or gains leakage), matching (DINO crops + Hungarian "
                                   "assignment to the references: confusion or a similarity drop of "
                                   "refresh_margin; eval.dino_model) or changed (every negative that differs).")
    refresh_margin: float = _f(0.05, "On-policy DIP, matching judge: the drop of the target's DINO similarity to "
                                     "its reference that makes a negative worse, >= 0.")
    refresh_embedder: str = _f("dino", "On-policy DIP, matching judge: the embedding of the crops: dino "
                                       "(eval.dino_model) or toy (the toy world's download-free colour / silhouette "
                                       "/ pattern / mark embedding, focusdpo.world.embedding).")
    refresh_strength: float = _f(0.75, "On-policy DIP: noise level the region is taken back to, in (0, 1] "
                                       "(as the regenerate disruption).")
    refresh_steps: int = _f(12, "On-policy DIP: Euler steps of the regeneration, >= 1.")
    refresh_guidance: float = _f(1.0, "On-policy DIP: classifier-free guidance of the regeneration (1: off), >= 0.")

    def __post_init__(self) -> None:
        _choice("data.mask_backend", self.mask_backend, ("auto", "models", "grabcut"))
        for name in ("mask_detector", "mask_segmenter", "mask_device"):
            _check(isinstance(getattr(self, name), str) and bool(getattr(self, name).strip()), f"data.{name}",
                   getattr(self, name), "a non-empty string")
        _check(isinstance(self.mask_min_score, (int, float)) and 0.0 <= self.mask_min_score <= 1.0,
               "data.mask_min_score", self.mask_min_score, "a number in [0, 1]")
        _check(self.n_records >= 1, "data.n_records", self.n_records, ">= 1")
        _check(self.shard_records >= 1, "data.shard_records", self.shard_records, ">= 1")
        _check(self.max_pixels >= 1, "data.max_pixels", self.max_pixels, ">= 1")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _check(isinstance(self.disruptions, dict) and len(self.disruptions) > 0, "data.disruptions",
               self.disruptions, "a non-empty mapping name -> weight")
        for name, w in self.disruptions.items():
            _choice(f"data.disruptions.{name}", name, DISRUPTIONS)
            _check(isinstance(w, (int, float)) and w >= 0, f"data.disruptions.{name}", w, "a weight >= 0")
        _check(sum(self.disruptions.values()) > 0, "data.disruptions", self.disruptions, "a positive total")
        _check(self.refresh_every >= 0, "data.refresh_every", self.refresh_every, ">= 0 (0: off)")
        _check(self.refresh_n >= 1, "data.refresh_n", self.refresh_n, ">= 1")
        _check(0 <= self.refresh_mix <= 1, "data.refresh_mix", self.refresh_mix, "in [0, 1]")
        _choice("data.refresh_judge", self.refresh_judge, ("toy", "matching", "changed"))
        _choice("data.refresh_embedder", self.refresh_embedder, ("dino", "toy"))
        _check(self.refresh_margin >= 0, "data.refresh_margin", self.refresh_margin, ">= 0")
        _check(0 < self.refresh_strength <= 1, "data.refresh_strength", self.refresh_strength, "in (0, 1]")
        _check(self.refresh_steps >= 1, "data.refresh_steps", self.refresh_steps, ">= 1")
        _check(self.refresh_guidance >= 0, "data.refresh_guidance", self.refresh_guidance, ">= 0")


@dataclass
class ModelConfig:
    """The backbone (DESIGN sections 3-5): fields every backbone reads, plus the chosen backbone's own section.

    In YAML the section sits under the backbone's name (``model.flux-tiny.num_layers``, ``model.flux.guidance``);
    in Python it is ``options`` (the dataclass the backbone registered, :mod:`focusdpo.backbones.options`).
    ``ModelConfig.of(backbone="flux", guidance=4.0, ...)`` sorts keyword fields into the two. A section of
    another backbone, or a field of one, is refused with the owner named, unless it only repeats that
    backbone's defaults (as configs written before the split do: their flat fields are moved with a warning).
    """

    backbone: str = _f("flux-tiny", "Backbone: a registered name (`focusdpo registry`): flux-tiny (built-in, "
                                   "CPU), flux (diffusers FLUX.1, UNO-style) or flux2 (diffusers FLUX.2 [klein]).")
    checkpoint: str | None = _f(None, "Base weights. flux-tiny: None = the base shipped with the package, or "
                                      "a folder written by `focusdpo pretrain`. flux, flux2: a local diffusers "
                                      "folder or hub id.")
    patch: int = _f(4, "Pixels per token side (DIP builds compute M_d at it): flux-tiny's pixel codec patch (4 on 32 "
                       "px scenes = 64 target tokens + 16 per 16 px reference); the VAE token size (16) for flux, "
                       "flux2.")
    max_text_tokens: int = _f(20, "Text tokens per prompt (padded; a longer prompt is an error): words for flux-tiny, "
                                  "T5 tokens for flux, Qwen3 tokens for flux2.")
    dtype: str = _f("float32", "Weight dtype of the frozen base: float32, bfloat16 or float16.")
    options: Any = _f(None, "The chosen backbone's own section, written model.<backbone>.<field> (None: its "
                            "defaults).")
    quantization: str = _f("none", "Frozen base weights of the transformer blocks (every backbone): none "
                                   "(model.dtype), int8 (torchao weight-only), fp8 (torchao; CUDA compute capability "
                                   ">= 8.9, or the CPU) or nf4 (bitsandbytes 4-bit, CUDA); LoRA stays float32 on top "
                                   "(docs/performance.md).")

    def __post_init__(self) -> None:
        from focusdpo.backbones import backbone_names, backbone_spec  # the registry: built-ins and registered ones

        _choice("model.backbone", self.backbone, backbone_names())
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for name in ("patch", "max_text_tokens"):
            _check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), ">= 1")
        _choice("model.quantization", self.quantization, ("none", "int8", "fp8", "nf4"))
        cls = backbone_spec(self.backbone).options
        if self.options is None:
            self.options = cls()
        elif isinstance(self.options, dict):
            self.options = _build(cls, self.options, f"model.{self.backbone}.")
        elif type(self.options) is not cls:
            raise ConfigError(f"model.{self.backbone}={self.options!r} is invalid: expected the section of backbone "
                              f"{self.backbone} ({cls.__name__})")

    @classmethod
    def of(cls, **fields: Any) -> ModelConfig:
        """A ModelConfig from flat keyword fields: the shared ones and the chosen backbone's section fields (a field
        of another backbone raises :class:`ConfigError` naming its owner)."""
        return _model_from_dict(fields, "model.", warn_moved=False)

    def section_dict(self) -> dict[str, Any]:
        """``{field: value}`` of the chosen backbone's section."""
        return dataclasses.asdict(self.options)


def _model_from_dict(data: dict[str, Any], prefix: str, warn_moved: bool = True) -> ModelConfig:
    """``model:`` mapping -> :class:`ModelConfig`: shared fields, the section named by ``backbone``; flat fields of
    the chosen backbone (configs written before the per-backbone sections) are moved into it with a warning."""
    import warnings

    from focusdpo.backbones import backbone_names, backbone_spec

    data = dict(data)
    backbone = data.get("backbone", ModelConfig.backbone)
    names = backbone_names()
    _choice(prefix + "backbone", backbone, names)
    shared = {f.name for f in dataclasses.fields(ModelConfig)} - {"options"}
    own = backbone_spec(backbone).options
    section = data.pop(backbone, None)
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(f"{prefix}{backbone}={section!r} is invalid: expected a mapping (the section of backbone "
                          f"{backbone})")
    section = dict(section)
    sections = {n: backbone_spec(n).options for n in names}
    for other in [k for k in data if k in sections]:  # another backbone's section: only its defaults may stay
        value = data.pop(other)
        defaults = dataclasses.asdict(sections[other]())
        if not isinstance(value, dict) or any(k not in defaults or defaults[k] != v for k, v in value.items()):
            raise ConfigError(f"{prefix}{other}={value!r} is the section of backbone {other}, but "
                              f"{prefix}backbone={backbone!r}: remove it or set {prefix}backbone={other}")
    own_fields = {f.name for f in dataclasses.fields(own)}
    moved = []
    for key in [k for k in data if k not in shared]:
        if key in own_fields:
            if key in section:
                raise ConfigError(f"{prefix}{key} and {prefix}{backbone}.{key} are both set: keep "
                                  f"{prefix}{backbone}.{key}")
            section[key] = data.pop(key)
            moved.append(key)
            continue
        owners = [n for n in names if key in {f.name for f in dataclasses.fields(sections[n])}]
        if owners:
            if getattr(sections[owners[0]](), key) == data[key]:  # an old flat dump repeats every default
                data.pop(key)
                continue
            raise ConfigError(f"{prefix}{key}={data[key]!r} belongs to backbone {' / '.join(owners)} "
                              f"({prefix}{owners[0]}.{key}), but {prefix}backbone={backbone!r}: remove it or set "
                              f"{prefix}backbone={owners[0]}")
    if moved and warn_moved:
        new = ", ".join(f"{prefix}{backbone}.{k}" for k in moved)
        warnings.warn(f"{', '.join(prefix + k for k in moved)}: flat fields of backbone {backbone} (a config written "
                      f"before the per-backbone sections); read as {new}: move them there", FutureWarning, stacklevel=3)
    unknown = sorted(set(data) - shared)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}: allowed under "
                          f"{prefix.rstrip('.')}: {', '.join(sorted(shared))} and the section {backbone}: "
                          f"{', '.join(sorted(own_fields)) or '(no fields)'}")
    hints = typing.get_type_hints(ModelConfig)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return ModelConfig(**kwargs, options=_build(own, section, f"{prefix}{backbone}."))


@dataclass
class FocusConfig:
    """Adaptive focus: SPAF (2.3), DPCE (2.4) and the dynamic weights (2.5)."""

    spaf: bool = _f(True, "Use the Structure-Preserving Attention Field terms (M_s, A).")
    dpce: bool = _f(True, "Use the Detail-Preserving Complexity Estimator term (M_d).")
    dynamic: bool = _f(True, "Gate the detail term on alignment a >= tau; false: always on.")
    readout: str = _f("attention", "SPAF's score S_k[n]: attention (the model's own attention field: softmax mass "
                                   "of target query n on reference k's keys, mask-weighted, head-averaged), cosine "
                                   "(hidden-state cosine to the pooled reference; the first implementation, kept as "
                                   "an ablation) or cosine_centered. Chosen with `focusdpo focus-probe --base`: "
                                   "a_train 0.83 (attention@all) vs 0.31 (cosine@double:1), chance 0.11 "
                                   "(docs/focus-probe.md).")
    tap_layer: str | int | None = _f("all", "Block(s) the focus tap reads: double:i, single:i, all (mean over "
                                           "every block) or null (the middle double-stream block); an int i means "
                                           "double:i. Chosen with `focusdpo focus-probe --base` (docs/focus-probe.md).")
    log_alignment: bool = _f(False, "Compute and log SPAF's alignment a for objectives that do not use the focus "
                                    "(sft, dpo, patchdpo); off, the policy forward runs without the tap.")
    rho: float = _f(1.0, "Top-k size factor: k_k = ceil(rho * |P_k|).")
    alpha_s: float = _f(2.0, "Weight added on confused/unmatched subject tokens M_s.")
    alpha_a: float = _f(0.5, "Weight removed on aligned tokens A.")
    alpha_d: float = _f(1.0, "Weight of the detail term M_d.")
    tau: float = _f(0.85, "Alignment threshold of the detail gate, in [0, 1]. 0.85: the median alignment a of the "
                          "attention readout on training-split scenes at the trainer's timesteps, so the gate opens in "
                          "about half of the steps, the better-aligned half (`python experiments/tune_focus.py`: "
                          "quantiles 0.70/0.79/0.87/0.92/1.00; the cosine readout's earlier default was 0.5).")
    w_min: float = _f(0.1, "Floor of the focus weights, in [0, 1): W_raw is clamped at it and W stays >= it "
                           "after normalising to mean 1.")
    sigma: float = _f(1.0, "DPCE Gaussian blur sigma in pixels (0: no blur).")
    bins: int = _f(32, "DPCE luminance quantisation levels, >= 2.")
    ref_complexity_scale: float = _f(0.0, "Scale each subject's terms by its reference's complexity (0: off).")
    weights_from: str = _f("positive", "Focus weights from the positive for both sides, or from each side.")

    def __post_init__(self) -> None:
        _check(self.rho > 0, "focus.rho", self.rho, "> 0")
        _check(0 <= self.tau <= 1, "focus.tau", self.tau, "in [0, 1]")
        _check(0 <= self.w_min < 1, "focus.w_min", self.w_min, "in [0, 1) (W has mean 1)")
        _check(self.sigma >= 0, "focus.sigma", self.sigma, ">= 0")
        _check(self.bins >= 2, "focus.bins", self.bins, ">= 2")
        for name in ("alpha_s", "alpha_a", "alpha_d", "ref_complexity_scale"):
            _check(getattr(self, name) >= 0, f"focus.{name}", getattr(self, name), ">= 0")
        _choice("focus.weights_from", self.weights_from, ("positive", "each"))
        _choice("focus.readout", self.readout, ("attention", "cosine", "cosine_centered"))
        if isinstance(self.tap_layer, int):
            _check(self.tap_layer >= 0, "focus.tap_layer", self.tap_layer, ">= 0 or null")
        elif self.tap_layer is not None:
            _check(re.fullmatch(r"all|(double|single):\d+", str(self.tap_layer).strip().lower()) is not None,
                   "focus.tap_layer", self.tap_layer, "double:i, single:i, all or null")


@dataclass
class LossConfig:
    """The objective's constants (DESIGN 2.2)."""

    beta: float = _f(500.0, "DPO temperature beta (> 0). Velocity targets need their own value.")
    lambda_sft: float = _f(0.0, "Weight of the added SFT term on the positive, >= 0.")
    prediction: str = _f("flow", "Target type: flow (velocity eps - x0) or epsilon.")
    logit_mean: float = _f(0.0, "Mean of the logit-normal timestep distribution.")
    logit_std: float = _f(1.0, "Std of the logit-normal timestep distribution, > 0.")
    time_shift: bool = _f(True, "Apply FLUX's resolution-dependent time shift to sampled timesteps.")
    patch_alpha: float = _f(1.0, "patchdpo objective: positive tokens inside M_prior weigh 1 + patch_alpha "
                                 "(before normalising to mean 1), >= 0.")

    def __post_init__(self) -> None:
        _check(self.beta > 0, "loss.beta", self.beta, "> 0")
        _check(self.patch_alpha >= 0, "loss.patch_alpha", self.patch_alpha, ">= 0")
        _check(self.lambda_sft >= 0, "loss.lambda_sft", self.lambda_sft, ">= 0")
        _choice("loss.prediction", self.prediction, ("flow", "epsilon"))
        _check(self.logit_std > 0, "loss.logit_std", self.logit_std, "> 0")


@dataclass
class LoraConfig:
    """LoRA adapters attached through peft."""

    rank: int = _f(8, "LoRA rank, >= 1.")
    alpha: float = _f(8.0, "LoRA alpha (scale = alpha / rank), > 0.")
    dropout: float = _f(0.0, "LoRA dropout, in [0, 1).")
    targets: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "to_add_out"], "Module names (peft target_modules) that get adapters.")

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", self.rank, ">= 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "> 0")
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "in [0, 1)")
        _check(len(self.targets) > 0, "lora.targets", self.targets, "a non-empty list")


@dataclass
class ValidationPrompt:
    """One of the user's validation prompts (``train.validation``): sampled with the LoRA during training."""

    prompt: str = _f("", "The prompt; its subjects in the order of the references.")
    references: list[str] = _f([], "Reference image files, one per subject, in order of mention (resized to the "
                                   "training records' reference size).")
    seed: int | None = _f(None, "Noise seed of this prompt (null: sample.seed).")

    def __post_init__(self) -> None:
        _check(isinstance(self.prompt, str) and bool(self.prompt.strip()), "train.validation[].prompt", self.prompt,
               "a non-empty prompt")
        _check(len(self.references) >= 1, "train.validation[].references", self.references,
               "a non-empty list of image files")


@dataclass
class TrainConfig:
    """The training loop (DESIGN 2.2-2.6, 7)."""

    objective: str = _f("focusdpo", "Objective: " + ", ".join(OBJECTIVES) + " or one registered in "
                                    "focusdpo.objectives.")
    max_steps: int = _f(300, "Optimizer steps.")
    lr: float = _f(1e-4, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(10, "Linear warm-up steps: step i < warmup_steps runs at i / warmup_steps of lr "
                               "(diffusers' get_scheduler, from 0).")
    schedule: str = _f("constant", "LR schedule after warm-up (diffusers' get_scheduler, shared by train and "
                                   "pretrain): constant, linear or cosine (both decay to 0 at max_steps).")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off).")
    mixed_precision: str = _f("auto", "auto, no, bf16 or fp16. auto: the launcher's setting when accelerate "
                                      "launch gave one (ACCELERATE_MIXED_PRECISION, from --mixed_precision or its "
                                      "config file), else bf16 where the GPU has it, else fp32 (no). A bare YAML "
                                      "`no` (read as false) means no.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    compile: bool = _f(False, "Regional torch.compile of the transformer's repeated blocks (diffusers "
                              "compile_repeated_blocks), for GPUs: the policy and reference forwards of every step.")
    compile_backend: str = _f("inductor", "torch.compile backend for train.compile (inductor; eager to debug).")
    seed: int = _f(0, "Seed of everything in the run: LoRA init, data order, noise, timesteps.")
    checkpoint_every: int = _f(100, "Checkpoint every N optimizer steps (0: only at the end and on signals).")
    output_dir: str | None = _f(None, "The run folder. None: runs/<objective>-<time>.")
    log_every: int = _f(1, "TensorBoard scalars every N optimizer steps (metrics.csv gets a row every step).")
    val_every: int = _f(0, "Write validation sample grids and focus strips every N steps (0: only at the end).")
    val_records: int = _f(4, "DIP records (one subject count and size) in the validation grids, >= 1.")
    keep_checkpoints: int = _f(0, "Keep only the N newest checkpoints (0: keep all).")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms: bit-exact resume on GPU at some speed "
                                    "cost (CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8); CPU runs are exact anyway.")
    report_to: str = _f("tensorboard", "Experiment tracker (accelerate's trackers): tensorboard (<run>/tb), wandb, "
                                       "mlflow or none; metrics.csv is written in every case. wandb and mlflow need "
                                       "their package (pip install 'focusdpo[trackers]').")
    tracker_project: str = _f("focusdpo", "W&B project / MLflow experiment name of train.report_to (the run is "
                                          "named after its folder).")
    validation: list[ValidationPrompt] = _f([], "Your own validation prompts, each {prompt, references: [image "
                                                "files], seed (optional)}: sampled with the LoRA every "
                                                "checkpoint_every steps and at the end into <run>/validation/"
                                                "step-N.png and the tracker (the files are checked before training).")
    optimizer: str = _f("adamw", "Optimizer of the LoRA: adamw (torch), adamw8bit (bitsandbytes 8-bit states, where "
                                 "it runs on the device) or adafactor (factored second moment).")
    memory: str = _f("fast", "Memory preset: fast (the fields decide), balanced (gradient checkpointing + latent/text "
                             "cache) or low (also the text encoders and VAE offloaded to the CPU); a preset only turns "
                             "savings on (`focusdpo config` prints each one; focusdpo.train.presets).")

    def __post_init__(self) -> None:
        from focusdpo.objectives import objective_names  # the registry: built-ins and registered ones

        _choice("train.objective", self.objective, objective_names())
        _check(self.max_steps >= 1, "train.max_steps", self.max_steps, ">= 1")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, ">= 0")
        _choice("train.schedule", self.schedule, ("constant", "linear", "cosine"))
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, ">= 1")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0")
        _choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        _check(bool(self.compile_backend), "train.compile_backend", self.compile_backend, "a torch.compile backend")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, ">= 0")
        _check(self.log_every >= 1, "train.log_every", self.log_every, ">= 1")
        _check(self.val_every >= 0, "train.val_every", self.val_every, ">= 0")
        _check(self.val_records >= 1, "train.val_records", self.val_records, ">= 1")
        _check(self.keep_checkpoints >= 0, "train.keep_checkpoints", self.keep_checkpoints, ">= 0")
        _choice("train.report_to", self.report_to, ("tensorboard", "wandb", "mlflow", "none"))
        _check(bool(self.tracker_project.strip()), "train.tracker_project", self.tracker_project, "a non-empty name")
        _choice("train.optimizer", self.optimizer, ("adamw", "adamw8bit", "adafactor"))
        _choice("train.memory", self.memory, ("fast", "balanced", "low"))


@dataclass
class SampleConfig:
    """The flow-matching Euler sampler."""

    steps: int = _f(20, "Euler steps.")
    guidance: float = _f(1.0, "Classifier-free guidance scale (1: off).")
    time_shift: bool = _f(True, "FLUX's resolution-dependent time shift of the schedule.")
    seed: int = _f(0, "Seed of the initial noise.")

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "sample.steps", self.steps, ">= 1")
        _check(self.guidance >= 0, "sample.guidance", self.guidance, ">= 0")


@dataclass
class EvalConfig:
    """Evaluation (DESIGN section 6)."""

    benchmark: str = _f("toy", "toy, dreambench-single or dreambench-multi.")
    seeds: list[int] = _f([0, 1, 2], "Sampling seeds; mean and spread are over these.")
    n_scenes: int = _f(16, "Toy: held-out scenes per subject count (16 x 2 counts x 3 seeds: ~1 min per method on 2 "
                             "CPU cores at 20 sampler steps).")
    subject_counts: list[int] = _f([2, 3], "Toy: numbers of subjects per scene.")
    samples_per_prompt: int = _f(1, "Samples per prompt and seed.")
    dino_model: str = _f("facebook/dino-vits16", "DreamBench: DINO ViT-S/16 path or hub id.")
    clip_model: str = _f("openai/clip-vit-base-patch32", "DreamBench: CLIP ViT-B/32 path or hub id.")
    batch_size: int = _f(16, "Images per forward pass when sampling (toy) or scoring (DreamBench).")
    grid_scenes: int = _f(6, "Toy: scenes shown in each PNG comparison grid (0: no grids).")
    workers: int = _f(1, "Toy: processes sampling in parallel, one torch thread each (2 on a 2-core machine: "
                         "processes keep both cores busy where threads of one process wait on each other).")
    chunk: int = _f(8, "Toy: images per sampler forward pass (speed only: the noise follows batch_size, so scores "
                       "do not depend on it beyond float rounding).")
    bootstrap: int = _f(2000, "Toy: bootstrap replicates of the 95 % paired intervals (units and training seeds "
                              "resampled jointly; focusdpo.eval.stats).")
    bootstrap_seed: int = _f(0, "Toy: seed of the bootstrap draws (fixed: a rerun gives the same intervals).")
    target_effect: float = _f(0.01, "Toy: the paired difference an evaluation should detect; reports warn when the "
                                    "detectable effect (80 % power, alpha 0.05) is larger.")
    dreambench_size: int = _f(512, "DreamBench generate: side of the generated square images (UNO: 512).")
    dreambench_ref_size: int | None = _f(None, "DreamBench generate: longest side of the references; None: the "
                                               "UNO defaults, 512 for one subject and 320 for several.")
    dreambench_seed: int = _f(3407, "DreamBench generate: image j of a prompt uses seed dreambench_seed + j (UNO).")
    dreambench_images: int = _f(1, "DreamBench generate: images per prompt (UNO reports 1 single, 6 multi).")
    confusion_detector: str = _f("", "DreamBench multi identity confusion: a zero-shot detector (OWLv2 / OWL-ViT hub "
                                     "id or local folder) that finds each subject's box from its name when an image "
                                     "has no <image>.boxes.json; empty: equal vertical strips.")
    confusion_min_score: float = _f(0.1, "DreamBench multi identity confusion: smallest detector score (sigmoid, in "
                                         "[0, 1]) that counts as finding a subject; below it the image falls back "
                                         "to strips.")

    def __post_init__(self) -> None:
        _choice("eval.benchmark", self.benchmark, ("toy", "dreambench-single", "dreambench-multi"))
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1")
        _check(self.grid_scenes >= 0, "eval.grid_scenes", self.grid_scenes, ">= 0")
        _check(self.chunk >= 1, "eval.chunk", self.chunk, ">= 1")
        _check(self.workers >= 1, "eval.workers", self.workers, ">= 1")
        _check(self.bootstrap >= 100, "eval.bootstrap", self.bootstrap, ">= 100")
        _check(self.target_effect > 0, "eval.target_effect", self.target_effect, "> 0")
        _check(self.dreambench_size >= 16 and self.dreambench_size % 16 == 0, "eval.dreambench_size",
               self.dreambench_size, "a multiple of 16, >= 16")
        if self.dreambench_ref_size is not None:
            _check(self.dreambench_ref_size >= 16, "eval.dreambench_ref_size", self.dreambench_ref_size,
                   ">= 16 or null")
        _check(self.dreambench_images >= 1, "eval.dreambench_images", self.dreambench_images, ">= 1")
        _check(0 <= self.confusion_min_score <= 1, "eval.confusion_min_score", self.confusion_min_score, "in [0, 1]")
        _check(len(self.seeds) >= 1, "eval.seeds", self.seeds, "a non-empty list")
        _check(self.n_scenes >= 1, "eval.n_scenes", self.n_scenes, ">= 1")
        _check(all(k in (1, 2, 3) for k in self.subject_counts) and self.subject_counts,
               "eval.subject_counts", self.subject_counts, "a non-empty list of 1, 2, 3")
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", self.samples_per_prompt, ">= 1")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    focus: FocusConfig = field(default_factory=FocusConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values, the model's backbone section under ``model.<backbone>`` (the YAML layout)."""
        out = dataclasses.asdict(self)
        model = {k: v for k, v in out["model"].items() if k != "options"}
        model[self.model.backbone] = self.model.section_dict()
        out["model"] = model
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, text: str) -> Config:
        return cls.from_dict(yaml.safe_load(text) or {})

    def with_overrides(self, overrides: typing.Sequence[str]) -> Config:
        """A validated copy with ``key.sub=value`` overrides applied (``self`` is not changed)."""
        data = self.to_dict()
        for item in overrides:
            key, value = parse_override(item)
            _set_dotted(data, key, value)
        return Config.from_dict(data)


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, nothing else is cast."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}={value!r} is invalid: expected {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} is invalid: expected a list")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} is invalid: expected a mapping")
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, name): _coerce(vt, v, f"{name}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):  # a section inside a list (train.validation): errors name its index
        try:
            return _build(tp, value, name + ".")
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"{name.split('[')[0]}[].", f"{name}.")) from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is invalid: allowed a finite number")
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, float, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{name}={value!r} is invalid: expected {getattr(tp, '__name__', tp)}")


# Fields that were removed: dotted name -> (the value every older config carries, why). Configs written before the
# removal (run folders) still load: the field is dropped, silently at that value, with a warning at another.
RETIRED = {"focus.top_k": (16, "it was never read (SPAF sizes each subject's top-k from its region P_k)")}


def _drop_retired(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    import warnings

    kept = dict(data)
    for key in list(kept):
        if prefix + key in RETIRED:
            value, why = RETIRED[prefix + key]
            if kept.pop(key) != value:
                warnings.warn(f"{prefix}{key} is no longer a config field ({why}): it is ignored; remove it",
                              FutureWarning, stacklevel=4)
    return kept


# Fields whose allowed string values include "no": YAML 1.1 (PyYAML) reads a bare `no`/`off`/`false` as the
# boolean False, in a file and in a `key=value` override alike, so False is taken as "no" there.
_FALSE_MEANS = {"train.mixed_precision": "no"}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={data!r} is invalid: expected a mapping")
    data = _drop_retired(data, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}: "
                          f"allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if tp is ModelConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}={value!r} is invalid: expected a mapping")
            kwargs[key] = _model_from_dict(value, f"{prefix}{key}.")
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            if value is False and prefix + key in _FALSE_MEANS:
                value = _FALSE_MEANS[prefix + key]
            kwargs[key] = _coerce(tp, value, prefix + key)
            _check_seed(prefix + key, kwargs[key])
    return cls(**kwargs)


SEED_RANGE = (0, 2**32 - 1)  # what numpy, torch and accelerate's set_seed all accept


def _check_seed(name: str, value: Any) -> None:
    """Seeds (``seed``, ``*_seed``, ``seeds``) must be integers in :data:`SEED_RANGE`."""
    leaf = name.rsplit(".", 1)[-1]
    if (leaf != "seeds" and leaf != "seed" and not leaf.endswith("_seed")) or value is None:  # None: optional seeds
        return
    lo, hi = SEED_RANGE
    for v in value if isinstance(value, list) else [value]:
        _check(isinstance(v, int) and lo <= v <= hi, name, value, f"integers in [{lo}, {hi}]")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping repeating a key (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                                  f"{seen[key]}): keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML (safe, unique keys); a :class:`ConfigError` naming ``source`` and the place."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{where} ({problem}): fix it") from e


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.max_steps=50"`` -> ``("train.max_steps", 50)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} is invalid: empty key")
    return key, _yaml(raw, f"override {text!r}") if raw.strip() else None


def default_config_text(name: str = "toy") -> str:
    """The text of a config shipped inside the package (``focusdpo/configs/<name>.yaml``)."""
    return resources.files("focusdpo").joinpath("configs", f"{name}.yaml").read_text()


def packaged_config_names() -> list[str]:
    """Names of the configs shipped inside the package (``focusdpo/configs/*.yaml``), sorted: what
    ``--config NAME`` accepts besides a file path."""
    folder = resources.files("focusdpo").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def packaged_config_summary(name: str) -> str:
    """The first line of a packaged config's header comment (what it is for), without the ``#``."""
    for line in default_config_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _packaged_name(path: str | Path) -> str | None:
    """``path`` as a packaged config name (``flux-uno`` or ``flux-uno.yaml``) when it is no existing file and
    has no folder part; None otherwise."""
    text = str(path)
    if Path(text).exists() or "/" in text or "\\" in text:
        return None
    name = text[: -len(".yaml")] if text.endswith(".yaml") else text
    return name if name in packaged_config_names() else None


def _read_config_file(path: Path) -> str:
    """The text of a config file; a :class:`ConfigError` naming it when it is missing, a folder or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at {e.start}): give a "
                          f"YAML file saved as UTF-8") from e
    except OSError as e:
        what = "is a folder" if path.is_dir() else f"cannot be read ({e.strerror or e})"
        raise ConfigError(f"config {path} {what}: give an existing YAML file to --config, or the name of a packaged "
                          f"config: {', '.join(packaged_config_names())} (`focusdpo config --list`)") from e


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, validate. ``path``: a file, or the name of a packaged config
    (``toy``, ``flux-uno``, ...: :func:`packaged_config_names`) when no such file exists; None: ``toy``."""
    name = "toy" if path is None else _packaged_name(path)
    text = default_config_text(name) if name is not None else _read_config_file(Path(path))
    data = _yaml(text, f"config {path or 'toy.yaml'}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path or 'toy.yaml'} must be a mapping at the top level")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return Config.from_dict(data)
