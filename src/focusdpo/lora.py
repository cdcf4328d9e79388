"""Generic LoRA plumbing over peft: attach adapters to any ``nn.Module``, switch them off and on, and
save/load their weights with safetensors.

Adapters are injected in place with ``peft.inject_adapter_in_model`` (no ``PeftModel`` wrapper), so the
backbone keeps its own class and forward. State dict keys follow the peft/diffusers convention with the
adapter name removed (``blocks.0.attn.to_q.lora_A.weight``), which diffusers' LoRA loaders read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from focusdpo.config import LoraConfig

ADAPTER = "default"


def _tuner_layers(module: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    """Whether peft adapter layers are attached anywhere in ``module``."""
    return bool(_tuner_layers(module))


def attach_lora(module: nn.Module, cfg: LoraConfig, dtype: torch.dtype | None = torch.float32) -> int:
    """Freeze ``module`` and inject LoRA adapters on the linear layers named by ``cfg.targets``.

    A target matches a module whose qualified name ends with ``.<target>`` (peft's rule). The adapter weights
    are kept in ``dtype`` (default float32, also on a bf16/fp16 base, so optimizer updates are not rounded
    away; peft casts the layer input to it). Returns the number of trainable (adapter) parameters. Raises if
    a target matches nothing or adapters are already attached.
    """
    if has_lora(module):
        raise ValueError("attach_lora: the module already has LoRA adapters; load weights into them instead")
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"lora.targets {missing} match no module of {type(module).__name__}: "
                         f"choose among linear layer names such as to_q, to_k, to_v, to_out.0, proj_mlp")
    module.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.targets), init_lora_weights=True)
    inject_adapter_in_model(peft_cfg, module, adapter_name=ADAPTER)
    params = lora_parameters(module)
    if dtype is not None:
        for p in params:
            p.data = p.data.to(dtype)
    return sum(p.numel() for p in params)


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (``lora_A``/``lora_B``) of ``module``, in a stable order."""
    return [p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def set_adapters_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every adapter layer of ``module`` on or off (off: the base model's exact output)."""
    layers = _tuner_layers(module)
    if not layers:
        raise ValueError("set_adapters_enabled: the module has no LoRA adapters (call attach_lora first)")
    for layer in layers:
        layer.enable_adapters(enabled)


def adapters_enabled(module: nn.Module) -> bool:
    """True when adapters are attached and on."""
    layers = _tuner_layers(module)
    return bool(layers) and not any(layer.disable_adapters for layer in layers)


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Adapters off inside the block and restored in ``finally`` (also when the body raises).

    Without adapters attached the block runs the module unchanged (it already is the base model).
    """
    layers = _tuner_layers(module)
    was_on = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, on in zip(layers, was_on, strict=True):
            layer.enable_adapters(on)


@contextmanager
def adapters_merged(module: nn.Module) -> Iterator[None]:
    """Adapters folded into the base weights inside the block (``W + scale * B A``: the same function with
    float rounding, one matmul per layer instead of three) and unfolded in ``finally``. For inference only:
    no gradient reaches the adapters while merged. A module without adapters runs unchanged. Layers over a
    quantised base (``model.quantization``) stay unmerged: merging would re-quantise ``W + BA``, and unmerging
    could not give the original quantised weights back."""
    from focusdpo.quantization import is_quantized_layer

    layers = [layer for layer in _tuner_layers(module) if not layer.disable_adapters and not is_quantized_layer(layer)]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in layers:
            layer.unmerge()


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights keyed without the adapter name, detached copies on their device."""
    if not has_lora(module):
        raise ValueError("lora_state_dict: the module has no LoRA adapters")
    tag = f".{ADAPTER}."
    return {n.replace(tag, "."): p.detach().clone() for n, p in module.named_parameters()
            if ".lora_A." in n or ".lora_B." in n}


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the tensors when LoRA weights hold NaN or inf (a corrupt file or
    a diverged run: its samples and metrics would look plausible and mean nothing)."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source}: LoRA weight(s) {bad[:3]} ({len(bad)} of {len(state_dict)}) hold NaN or inf; "
                         f"the file is corrupt or the run diverged: use an earlier checkpoint or retrain")


def load_lora_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter weights into the attached adapters; missing or unexpected keys, shape mismatches and NaN or
    inf values raise."""
    check_finite(state_dict, "the LoRA weights to load")
    own = lora_state_dict(module)
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not fit the attached adapters (same lora.targets and model?): "
                         f"missing {missing[:4]} ({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)})")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, value in state_dict.items():
            name = key.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}.")
            if params[name].shape != value.shape:
                raise ValueError(f"LoRA weight {key}: shape {tuple(value.shape)} != {tuple(params[name].shape)} "
                                 f"(different lora.rank or model size?)")
            params[name].copy_(value)


def save_lora(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write adapter weights to a safetensors file atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """Read adapter weights written by :func:`save_lora` (safetensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights {path} not found: pass the .safetensors file a run wrote")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a truncated or foreign file
        raise ValueError(f"LoRA weights {path} cannot be read ({type(e).__name__}: {e}): the file is truncated or "
                         f"not safetensors; use the run's checkpoint copy or retrain") from e
    check_finite(state, f"LoRA weights {path}")
    return state
