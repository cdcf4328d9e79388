"""LoRA export in diffusers' naming: ``FluxPipeline.load_lora_weights(run_dir)`` loads what we trained.

The trained adapters are peft ``LoraLayer`` modules inside the FLUX transformer. For each one we write
``transformer.<module path>.lora_A.weight`` (``[r, in]``) and ``.lora_B.weight`` (``[out, r]``) into
``<out_dir>/pytorch_lora_weights.safetensors`` through ``FluxPipeline.save_lora_weights`` (the file name
diffusers looks for first in a folder). The peft scale ``alpha / r`` is folded into ``lora_B``, so the file
carries no alpha and every reader's default (``alpha = r``, scale 1) reproduces our output exactly, including
readers that ignore LoRA metadata. Module paths are the diffusers ``FluxTransformer2DModel`` ones
(``transformer_blocks.3.attn.to_q``); a peft wrapper prefix (``base_model.model.``) is removed.
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
    from diffusers import FluxPipeline

    state = {k: v.to(dtype) for k, v in diffusers_lora_state_dict(transformer, adapter).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=state, weight_name=WEIGHT_NAME)
    return out_dir / WEIGHT_NAME
