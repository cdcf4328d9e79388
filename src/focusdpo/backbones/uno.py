"""Import of UNO's released LoRA (``bytedance-research/UNO``, ``dit_lora.safetensors``) into diffusers FLUX.

UNO trains LoRA through attention *processors* of the original (BFL) FLUX code, so its state dict is named
after those processors, not after diffusers modules. Read from UNO's model code (``uno/flux/modules/layers.py``
and ``set_lora`` in ``uno/flux/util.py``): every block gets a processor whose LoRA pairs are
``LoRALinearLayer(down: Linear(in, r), up: Linear(r, out))`` with output ``up(down(x))`` (``network_alpha``
None, ``lora_weight`` 1), saved as ``<block>.processor.<pair>.{down,up}.weight``:

====================================  ================================  ========================================
UNO key (block ``i``)                 BFL layer it adds to              diffusers module(s)
====================================  ================================  ========================================
``double_blocks.i…qkv_lora1``         ``img_attn.qkv`` (fused q, k, v)  ``transformer_blocks.i.attn.to_{q,k,v}``
``double_blocks.i…proj_lora1``        ``img_attn.proj``                 ``transformer_blocks.i.attn.to_out.0``
``double_blocks.i…qkv_lora2``         ``txt_attn.qkv``                  ``…attn.add_{q,k,v}_proj``
``double_blocks.i…proj_lora2``        ``txt_attn.proj``                 ``…attn.to_add_out``
``single_blocks.i…qkv_lora``          q, k, v part of ``linear1``       ``single_transformer_blocks.i.attn.to_{q,k,v}``
``single_blocks.i…proj_lora``         ``linear2`` (in: attn ⊕ mlp)      ``single_transformer_blocks.i.proj_out``
====================================  ================================  ========================================

A fused ``qkv`` pair splits exactly: its ``up`` rows are ``[q; k; v]`` (BFL's ``"B L (K H D)"`` layout with
``K = 3`` outermost), so q, k and v share ``down`` and take one third of ``up`` each. The single-stream
``linear2`` input is ``cat(attn, mlp)`` in both codebases, so ``proj_lora`` maps onto ``proj_out`` unchanged.

The import merges ``W += scale * up @ down`` into the base weights (the UNO model *is* the base that FocusDPO
post-trains and the DPO reference), or converts to diffusers/peft LoRA naming for ``load_lora_weights``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DOUBLE_PAIRS: dict[str, tuple[str, ...]] = {
    "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "proj_lora1": ("attn.to_out.0",),
    "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "proj_lora2": ("attn.to_add_out",),
}
SINGLE_PAIRS: dict[str, tuple[str, ...]] = {
    "qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "proj_lora": ("proj_out",),
}
_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.([a-z0-9_]+)\.(down|up)\.weight$")


class UnoLoraError(ValueError):
    """The state dict is not a UNO LoRA for this transformer; the message lists the offending keys."""


@dataclass
class LoraPair:
    """One low-rank update ``delta W = up @ down`` of a diffusers ``nn.Linear``: down ``[r, in]``, up ``[out, r]``."""

    down: torch.Tensor
    up: torch.Tensor


def _expected_keys(num_layers: int, num_single_layers: int) -> set[str]:
    keys = set()
    for kind, n, pairs in (("double_blocks", num_layers, DOUBLE_PAIRS), ("single_blocks", num_single_layers,
                                                                        SINGLE_PAIRS)):
        for i in range(n):
            keys |= {f"{kind}.{i}.processor.{p}.{s}.weight" for p in pairs for s in ("down", "up")}
    return keys


def _check_keys(state_dict: dict[str, torch.Tensor], num_layers: int, num_single_layers: int,
                require_all_blocks: bool) -> None:
    expected = _expected_keys(num_layers, num_single_layers)
    unknown = sorted(set(state_dict) - expected)
    if require_all_blocks:
        missing = sorted(expected - set(state_dict))
    else:  # a block that is present must be complete (UNO may train a subset of blocks)
        present = {".".join(k.split(".")[:2]) for k in state_dict if k in expected}
        missing = sorted(k for k in expected - set(state_dict) if ".".join(k.split(".")[:2]) in present)
    if unknown or missing:
        raise UnoLoraError(
            f"not a UNO LoRA for a FLUX transformer with {num_layers} double and {num_single_layers} single "
            f"blocks: {len(unknown)} unknown key(s) {unknown[:20]}{' ...' if len(unknown) > 20 else ''}; "
            f"{len(missing)} missing key(s) {missing[:20]}{' ...' if len(missing) > 20 else ''}. Expected "
            f"'<double|single>_blocks.<i>.processor.<pair>.<down|up>.weight' as saved by UNO's train.py")


def uno_to_diffusers_pairs(state_dict: dict[str, torch.Tensor], num_layers: int, num_single_layers: int,
                           require_all_blocks: bool = True) -> dict[str, LoraPair]:
    """UNO processor LoRA -> ``{diffusers module path: LoraPair}``.

    Raises :class:`UnoLoraError` listing every unknown key (not UNO's naming, or a block index past the
    transformer's) and every missing key; with ``require_all_blocks=False`` only blocks that appear must be
    complete. A fused qkv pair becomes three pairs sharing ``down`` (``up`` split in row thirds).
    """
    _check_keys(state_dict, num_layers, num_single_layers, require_all_blocks)
    out: dict[str, LoraPair] = {}
    for key in sorted(state_dict):
        kind, idx, pair, side = _KEY.match(key).groups()
        if side != "down":
            continue
        down = state_dict[key]
        up = state_dict[key[: -len("down.weight")] + "up.weight"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise UnoLoraError(f"{key}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair "
                               f"(expected down [r, in], up [out, r])")
        targets = (DOUBLE_PAIRS if kind == "double_blocks" else SINGLE_PAIRS)[pair]
        prefix = ("transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks") + f".{idx}."
        if up.shape[0] % len(targets):
            raise UnoLoraError(f"{key[: -len('.down.weight')]}: up has {up.shape[0]} rows, not divisible into "
                               f"{len(targets)} projections")
        for name, part in zip(targets, up.chunk(len(targets), dim=0), strict=True):
            out[prefix + name] = LoraPair(down, part)
    return out


def _target_linear(transformer: nn.Module, path: str, pair: LoraPair) -> nn.Linear:
    try:
        module = transformer.get_submodule(path)
    except AttributeError as e:
        raise UnoLoraError(f"UNO LoRA target {path!r} is not a module of the transformer") from e
    module = getattr(module, "base_layer", module)  # a peft-wrapped Linear merges into its base
    if not isinstance(module, nn.Linear):
        raise UnoLoraError(f"UNO LoRA target {path!r} is a {type(module).__name__}, not nn.Linear")
    want = (module.out_features, module.in_features)
    if (pair.up.shape[0], pair.down.shape[1]) != want:
        raise UnoLoraError(f"UNO LoRA for {path!r} has shape [out, in] = {[pair.up.shape[0], pair.down.shape[1]]}, "
                           f"the transformer's layer has {list(want)}: the LoRA is for another FLUX size")
    return module


def merge_uno_lora(transformer: nn.Module, state_dict: dict[str, torch.Tensor], scale: float = 1.0,
                   require_all_blocks: bool = True) -> int:
    """Merge a UNO LoRA into a diffusers ``FluxTransformer2DModel`` in place: ``W += scale * up @ down``.

    The product is formed in float32 on the weight's device and cast back to the weight's dtype. Every
    target is checked before any weight changes, so a bad file leaves the model untouched. Returns the
    number of ``nn.Linear`` layers updated.
    """
    cfg = transformer.config
    pairs = uno_to_diffusers_pairs(state_dict, cfg.num_layers, cfg.num_single_layers, require_all_blocks)
    layers = {path: _target_linear(transformer, path, pair) for path, pair in pairs.items()}
    with torch.no_grad():
        for path, pair in pairs.items():
            w = layers[path].weight
            delta = pair.up.to(w.device, torch.float32) @ pair.down.to(w.device, torch.float32)
            w.copy_((w.float() + scale * delta).to(w.dtype))
    return len(layers)


def uno_to_peft_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int, num_single_layers: int,
                           scale: float = 1.0) -> dict[str, torch.Tensor]:
    """UNO LoRA -> diffusers/peft naming (``<module>.lora_A.weight`` = down, ``.lora_B.weight`` = scale * up),
    for ``FluxPipeline.load_lora_weights`` with ``lora_alpha = r`` (no prefix; see :mod:`lora_export`)."""
    pairs = uno_to_diffusers_pairs(state_dict, num_layers, num_single_layers)
    out = {}
    for path, pair in pairs.items():
        out[f"{path}.lora_A.weight"] = pair.down.contiguous().clone()
        out[f"{path}.lora_B.weight"] = (pair.up * scale).contiguous()
    return out


def load_uno_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``dit_lora.safetensors`` (safetensors only: no pickle)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise UnoLoraError(f"model.lora_import={str(path)!r}: expected a .safetensors file (UNO's dit_lora)")
    if not path.is_file():
        raise UnoLoraError(f"model.lora_import={str(path)!r} does not exist: give the path of dit_lora.safetensors")
    return load_file(str(path))
