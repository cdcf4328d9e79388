"""The memory budget of a training run, estimated without training (``focusdpo train --dry-run``, issue 17).

Weights are counted, not guessed: the transformer (and the text encoders and VAE) of the configured backbone is
built at random init on the ``meta`` device (no memory, no download) from the checkpoint folder's own
``config.json`` files, or, for a FLUX.1 hub id that is not a local folder, from FLUX.1-dev's published
architecture. Each parameter is then priced at what it will hold on the device:

- the block linears that ``model.quantization`` converts (:func:`focusdpo.quantization.quantized_linears`):
  ``int8`` 1 byte a weight + 5 bytes a row (float32 scale, int8 zero point; torchao), ``fp8`` 1 byte + 4 bytes a row,
  ``nf4`` half a byte + one uint8 absmax per 64 weights + one float32 per 256 absmax (bitsandbytes with double
  quantisation) + its two code tables; ``none`` and every other parameter: ``model.dtype``;
- LoRA: ``rank * (in + out)`` float32 weights per targeted linear, the same again for their gradients;
- optimizer state: AdamW two float32 moments; ``adamw8bit`` two uint8 moments + a float32 absmax per 256-block
  and two 256-entry maps per tensor (bitsandbytes' blockwise 8-bit state; 32-bit for tensors under 4096
  elements); ``adafactor`` a float32 row and column second moment per matrix;
- the text encoders and VAE: on the device unless offloaded (``model.<backbone>.offload_encoders`` or
  ``train.memory=low``);
  offloaded with the latent/text cache filled they never come back, without the cache each encode moves them over
  for the call (reported as the peak of a cache miss).

Activations are modelled, not traced (the meta device runs attention as an explicit ``L x L`` softmax, where the
GPU runs a fused kernel that stores none, so tracing it would count what a run never holds). The policy forward runs
on the positive and the negative of every pair (``B = 2 * data.batch_size`` images) with gradients; the reference
forward runs without them and frees its activations before the policy's. With ``L`` tokens (text + target +
references), width ``D`` and ``n`` blocks:

- without gradient checkpointing a block keeps ``c * L * D`` values per image for its backward;
- with it, a block keeps only its input (``L * D`` values per image: image and text streams together) and one block
  at a time holds its ``c * L * D`` again while it is recomputed;
- the focus tap (``train.objective=focusdpo`` or ``focus.log_alignment``) adds its running mean of the tapped hidden
  states, ``B * L * D`` float32 values.

``c = 12.75`` (in values of the activation dtype) is fitted to the measured anchor of DESIGN section 5: FLUX.1-dev
architecture, 512 px target + one 512 px reference + 512 text tokens, LoRA r16 on the default targets, bf16, AdamW,
one pair: 44 GiB peak without checkpointing on an H200. The same model then predicts 24.7 GiB with checkpointing,
against the 24.8 GiB measured there. A 10 % margin is added for the CUDA caching allocator's fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from focusdpo.backbones.architecture import DTYPE_BYTES, meta_architecture
from focusdpo.config import Config, ConfigError
from focusdpo.quantization import quantized_linears

ACTIVATION_C = 12.75  # values kept per token, per width unit, per block and image without checkpointing (fitted)
MARGIN = 0.10  # allocator fragmentation
GB, GIB = 1e9, 2**30

@dataclass
class Budget:
    """Estimated device memory of one training step, by part (bytes), and notes on what it assumes."""

    parts: dict[str, float]
    shape: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def subtotal(self) -> float:
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        return self.subtotal * (1 + MARGIN)

    def table(self) -> str:
        """A markdown table (GiB and GB; MiB and MB below 1 GiB) with the total, the shape and the notes."""
        s = self.shape
        big = self.total >= GIB
        (b2, n2), (b10, n10) = ((GIB, "GiB"), (GB, "GB")) if big else ((2**20, "MiB"), (1e6, "MB"))
        lines = [f"estimated training memory per device: {s['size']} px target, K={s['refs']} reference(s) of "
                 f"{s['ref_size']} px, {s['text_tokens']} text tokens, {s['pairs']} pair(s) per step "
                 f"(L = {s['tokens']} tokens, width {s['width']}, {s['blocks']} blocks)", "",
                 f"| part | {n2} | {n10} |", "|---|---|---|"]
        rows = list(self.parts.items()) + [(f"margin {MARGIN:.0%} (allocator)", self.subtotal * MARGIN),
                                           ("**total**", self.total)]
        lines += [f"| {k} | {v / b2:.2f} | {v / b10:.2f} |" for k, v in rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def estimate_budget(cfg: Config, size: int | None = None, refs: int = 1, ref_size: int | None = None) -> Budget:
    """The :class:`Budget` of ``cfg`` for ``size`` px targets with ``refs`` references of ``ref_size`` px (defaults:
    the world's sizes for flux-tiny, 512 px for the real backbones) and ``model.max_text_tokens`` text tokens."""
    m = cfg.model
    arch = meta_architecture(m)  # focusdpo.backbones.architecture: the transformer on meta, the encoders' bytes
    transformer, encoders, notes = arch.transformer, arch.encoders, arch.notes
    size = size or arch.native_size or cfg.world.scene_size
    ref_size = ref_size or (size if arch.native_size else cfg.world.ref_size)
    base, lora = _transformer_bytes(transformer, m.quantization, DTYPE_BYTES[m.dtype], cfg.lora)
    eff = effective(cfg)
    parts = {f"frozen transformer ({m.quantization if m.quantization != 'none' else m.dtype})": base,
             "LoRA adapters (float32)": lora["weights"], "LoRA gradients (float32)": lora["weights"],
             f"optimizer state ({eff.train.optimizer})": _optimizer_bytes(eff.train.optimizer, lora["tensors"])}
    enc_bytes = sum(encoders.values())
    opts = eff.model.options
    offload = bool(getattr(opts, "offload_encoders", False))
    parts["text encoders + VAE" + (" (offloaded to the CPU)" if offload else "")] = 0.0 if offload else enc_bytes
    if offload and not getattr(opts, "latent_cache", None) and enc_bytes:
        notes.append(f"without model.{m.backbone}.latent_cache every encode moves the encoders over: the peak of a "
                     f"step then grows by up to {max(encoders.values()) / GIB:.2f} GiB (the largest encoder)")
    shape = _shape(transformer, m.patch, size, refs, ref_size, m.max_text_tokens, cfg.data.batch_size)
    parts.update(_activation_bytes(shape, eff, _act_bytes(cfg, arch.gpu)))
    return Budget(parts, shape, notes)


def effective(cfg: Config) -> Config:
    """``cfg`` with the ``train.memory`` preset applied when the config has one (another module's concern)."""
    from focusdpo.train import presets

    return presets.effective_config(cfg)


def _act_bytes(cfg: Config, gpu: bool) -> int:
    mp = cfg.train.mixed_precision
    if mp in ("bf16", "fp16") or (mp == "auto" and gpu):
        return 2  # auto is bf16 on the GPUs the real backbones train on
    return DTYPE_BYTES[cfg.model.dtype]


def _shape(transformer: nn.Module, patch: int, size: int, refs: int, ref_size: int, text: int, pairs: int
           ) -> dict[str, int]:
    for name, value in (("size", size), ("ref_size", ref_size)):
        if value % patch:
            raise ConfigError(f"--{name.replace('_', '-')}={value} is invalid: allowed a multiple of "
                              f"model.patch={patch}")
    c = transformer.config
    n, m = (size // patch) ** 2, (ref_size // patch) ** 2
    return {"size": size, "refs": refs, "ref_size": ref_size, "text_tokens": text, "pairs": pairs,
            "tokens": text + n + refs * m, "width": c.num_attention_heads * c.attention_head_dim,
            "blocks": c.num_layers + c.num_single_layers}


def _activation_bytes(shape: dict[str, int], cfg: Config, act: int) -> dict[str, float]:
    images, per_block = 2 * shape["pairs"], shape["tokens"] * shape["width"]
    full = ACTIVATION_C * per_block * images * act
    out = {}
    if cfg.train.gradient_checkpointing:
        out["activations: block inputs (checkpointed)"] = shape["blocks"] * per_block * images * act
        out["activations: one block recomputed"] = full
    else:
        out["activations: every block (no checkpointing)"] = shape["blocks"] * full
    if cfg.train.objective == "focusdpo" or cfg.focus.log_alignment:
        out["focus tap (float32 running mean)"] = images * per_block * 4
    return out


def _transformer_bytes(transformer: nn.Module, quantization: str, dtype_bytes: int, lora_cfg: Any
                       ) -> tuple[float, dict[str, Any]]:
    """``(frozen base bytes, {"weights": LoRA bytes, "tensors": [(rows, cols), ...]})`` of a meta-device model."""
    quantized = {id(m) for _, m in quantized_linears(transformer)} if quantization != "none" else set()
    total = 0.0
    for module in transformer.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(module) in quantized and name == "weight":
                total += _quantized_weight_bytes(p.shape[0], p.shape[1], quantization)
            else:
                total += p.numel() * dtype_bytes
    shapes = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in lora_cfg.targets):
            shapes += [(lora_cfg.rank, module.in_features), (module.out_features, lora_cfg.rank)]
    return total, {"weights": sum(a * b for a, b in shapes) * 4, "tensors": shapes}


def _quantized_weight_bytes(rows: int, cols: int, quantization: str) -> float:
    n = rows * cols
    if quantization == "int8":
        return n + 5 * rows
    if quantization == "fp8":
        return n + 4 * rows
    blocks = math.ceil(n / 64)  # nf4: packed nibbles, uint8 absmax per block, float32 per 256 absmax, code tables
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 16 * 4 + 256 * 4


def _optimizer_bytes(optimizer: str, shapes: list[tuple[int, int]]) -> float:
    """State bytes per LoRA matrix ``(rows, cols)``: torch keeps a float32 ``step`` per tensor; bitsandbytes keeps
    its two 256-entry quantisation maps per tensor instead."""
    if optimizer == "adafactor":
        return sum(4 * (r + c) + 4 for r, c in shapes)
    if optimizer == "adamw8bit":
        return sum(2 * r * c + 2 * 4 * math.ceil(r * c / 256) + 2 * 256 * 4 if r * c >= 4096 else 8 * r * c
                   for r, c in shapes)
    return sum(8 * r * c + 4 for r, c in shapes)
