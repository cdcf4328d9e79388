"""LoRA export in diffusers' naming: ``FluxPipeline.load_lora_weights(run_dir)`` loads what we trained.

The trained adapters are peft ``LoraLayer`` modules inside the FLUX transformer. For each one we write
``transformer.<module path>.lora_A.weight`` (``[r, in]``) and ``.lora_B.weight`` (``[out, r]``) into
``<out_dir>/pytorch_lora_weights.safetensors`` through ``FluxPipeline.save_lora_weights`` (the file name
diffusers looks for first in a folder). The peft scale ``alpha / r`` is folded into ``lora_B``, so the file
carries no alpha and every reader's default (``alpha = r``, scale 1) reproduces our output exactly, including
readers that ignore LoRA metadata. Module paths are the diffusers ``FluxTransformer2DModel`` ones
(``transformer_blocks.3.attn.to_q``); a peft wrapper prefix (``base_model.model.``) is removed.

The same file serves FLUX.2: ``Flux2KleinPipeline.load_lora_weights(run_dir)`` reads these ``transformer.*``
keys unchanged (``Flux2Transformer2DModel`` module paths such as
``single_transformer_blocks.0.attn.to_qkv_mlp_proj``), tested in ``tests/backbones/test_flux2_export.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_WRAPPER_PREFIXES = ("base_model.model.",)


def _strip(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def diffusers_lora_state_dict(transformer: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft LoRA layers of ``transformer`` -> ``{"<path>.lora_A.weight": A, "<path>.lora_B.weight": scale * B}``.

    Tensors are detached float32 CPU copies. Raises if there is no LoRA layer with adapter ``adapter`` or if
    a layer uses a variant diffusers' plain LoRA cannot express (DoRA, bias on B).
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(f"LoRA layer {name!r} uses DoRA: diffusers-naming export supports plain LoRA only")
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or b.bias is not None:
            raise ValueError(f"LoRA layer {name!r} is not a plain Linear A/B pair (bias or conv): cannot export")
        scale = float(module.scaling[adapter])
        path = _strip(name)
        out[f"{path}.lora_A.weight"] = a.weight.detach().to("cpu", torch.float32).clone()
        out[f"{path}.lora_B.weight"] = (b.weight.detach().to("cpu", torch.float32) * scale).contiguous()
    if not out:
        raise ValueError(f"no peft LoRA layer with adapter {adapter!r} in {type(transformer).__name__}: "
                         f"attach LoRA (Backbone.add_lora) before exporting")
    return out


def export_diffusers_lora(transformer: nn.Module, out_dir: str | Path, adapter: str = "default",
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write the LoRA of ``transformer`` for ``FluxPipeline.load_lora_weights(out_dir)``; returns the file.

    ``dtype``: stored precision (float32 default; bfloat16 halves the file).
    """
    return _write(diffusers_lora_state_dict(transformer, adapter), out_dir, dtype)


def scaled_lora_state_dict(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Our LoRA state dict (``<path>.lora_A.weight``/``.lora_B.weight``, as ``Backbone.lora_state_dict`` and
    ``lora.safetensors`` hold it) -> the same keys with ``scale = alpha / rank`` folded into ``lora_B``."""
    keys = set(state_dict)
    odd = sorted(k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    unpaired = sorted(k for k in keys if k.endswith(".lora_A.weight") and k.replace("lora_A", "lora_B") not in keys)
    unpaired += sorted(k for k in keys if k.endswith(".lora_B.weight") and k.replace("lora_B", "lora_A") not in keys)
    if odd or unpaired or not keys:
        raise ValueError(f"not a LoRA state dict of <module>.lora_A/.lora_B weights: unexpected keys {odd[:5]}, "
                         f"unpaired {unpaired[:5]}{', empty' if not keys else ''}")
    return {_strip(k): (v.float() * scale if ".lora_B." in k else v.float()).contiguous()
            for k, v in state_dict.items()}


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a finished run's ``lora.safetensors`` (rank and alpha in its metadata) to diffusers naming in
    ``out_dir`` (default: the run folder itself, so ``FluxPipeline.load_lora_weights(run_dir)`` works).
    No model is loaded."""
    from safetensors import safe_open

    src = Path(run_dir) / "lora.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: pass a finished run folder (train writes lora.safetensors)")
    from focusdpo.lora import load_lora

    state = load_lora(src)  # names a truncated file or NaN/inf weights before anything is written
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
    if "rank" not in meta or "alpha" not in meta:
        raise ValueError(f"{src} has no rank/alpha metadata (keys {sorted(meta)}): it was not written by "
                         f"`focusdpo train`; use export_diffusers_lora on a model with the LoRA attached")
    scale = float(meta["alpha"]) / float(meta["rank"])
    return _write(scaled_lora_state_dict(state, scale), out_dir or run_dir, dtype)


def _write(state: dict[str, torch.Tensor], out_dir: str | Path, dtype: torch.dtype) -> Path:
    from diffusers import FluxPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers={k: v.to(dtype) for k, v in state.items()},
                                   weight_name=WEIGHT_NAME)
    return out_dir / WEIGHT_NAME
