"""A quantised frozen base (``model.quantization``, issue 17): int8 and fp8 through torchao, nf4 through bitsandbytes.

Which layers: every ``nn.Linear`` inside an ``nn.ModuleList`` of the trainable module, i.e. the repeated
transformer blocks (FLUX.1: ``transformer_blocks`` + ``single_transformer_blocks``, 99.4 % of FLUX.1-dev's
weights; FLUX.2 the same names). The embedders, the modulation of the output norm and ``proj_out`` sit outside the
block lists and stay in the compute dtype: they are small and every token passes through them. The rule needs no
names, so a backbone added through the registry is covered too.

Why these libraries (all three run on CPU for the tests and on CUDA for users, with the versions pinned in
``pyproject.toml``'s ``quant`` extra):

- ``int8``: torchao ``Int8WeightOnlyConfig`` (per-channel symmetric int8 weights, dequantised in the matmul).
  peft wraps torchao weights with ``TorchaoLoraLinear`` (peft >= 0.14), so LoRA sits on top in its own dtype.
- ``fp8``: torchao ``Float8WeightOnlyConfig`` (e4m3 weights, per-channel scales). On CUDA it needs a device
  with fp8 (compute capability >= 8.9: Ada, Hopper, Blackwell); on the CPU torchao stores fp8 and dequantises
  each matmul (for the tests; no speed-up).
- ``nf4``: bitsandbytes ``Linear4bit`` (QLoRA's 4-bit NormalFloat, blocks of 64 with an fp32 absmax each);
  peft wraps it with its bnb ``Linear4bit`` LoRA layer. bitsandbytes >= 0.48 runs it on the CPU as well.

optimum-quanto was not chosen: peft's quanto support is marked experimental and its int8 path is slower on CPU.

The DPO reference model is the same quantised base with adapters off (``Backbone.reference()``): one copy. LoRA
merging for fast sampling (:func:`focusdpo.lora.adapters_merged`) leaves quantised layers unmerged: merging
would re-quantise ``W + BA`` and unmerging could not give the original weights back.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from focusdpo.config import ConfigError

QUANTIZATIONS = ("none", "int8", "fp8", "nf4")
_EXTRA = "pip install 'focusdpo[quant]'"


def check_quantization(mode: str, device: torch.device | str | None) -> None:
    """Raise :class:`ConfigError` at once when ``model.quantization=mode`` cannot run on ``device``, naming why."""
    device = torch.device(device or "cpu")
    if mode not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization={mode!r} is invalid: allowed {', '.join(QUANTIZATIONS)}")
    if mode == "none":
        return
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"model.quantization={mode!r} is invalid on device {device.type}: torchao/bitsandbytes "
                          f"run on cpu and cuda; allowed none")
    lib = "bitsandbytes" if mode == "nf4" else "torchao"
    if importlib.util.find_spec(lib) is None:
        raise ConfigError(f"model.quantization={mode!r} needs {lib}, which is not installed: {_EXTRA}")
    if mode == "fp8" and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise ConfigError(f"model.quantization='fp8' is invalid on {torch.cuda.get_device_name(device)} (compute "
                              f"capability {cap[0]}.{cap[1]}): fp8 needs >= 8.9 (Ada, Hopper, Blackwell); allowed "
                              f"int8 or nf4 on this device")
    if mode == "nf4" and device.type == "cpu":
        raise ConfigError("model.quantization='nf4' is invalid on the CPU: bitsandbytes' CPU 4-bit path repacks the "
                          "weights in place at the first no-grad forward (sampling, validation) and needs every "
                          "layer width to be a multiple of 64; allowed int8 or fp8 on the CPU, nf4 on CUDA")


def quantized_linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the plain ``nn.Linear`` layers the rule quantises: those inside an ``nn.ModuleList``."""
    inside: set[str] = set()
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList):
            inside.update(f"{name}.{n}" if name else n for n, _ in child.named_modules() if n)
    return [(n, m) for n, m in module.named_modules() if n in inside and type(m) is nn.Linear]


def quantize_frozen(module: nn.Module, mode: str) -> int:
    """Quantise the frozen block linears of ``module`` in place (``mode`` in :data:`QUANTIZATIONS`); returns how
    many layers were converted (0 for ``none``). Call before LoRA is attached; the weights must be frozen."""
    if mode == "none":
        return 0
    if mode not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization={mode!r} is invalid: allowed {', '.join(QUANTIZATIONS)}")
    targets = quantized_linears(module)
    if not targets:
        raise ValueError(f"model.quantization={mode!r}: {type(module).__name__} has no nn.Linear inside a block "
                         f"list to quantise")
    if any(p.requires_grad for _, m in targets for p in m.parameters()):
        raise ValueError("quantize_frozen: the base weights must be frozen (requires_grad_(False)) first")
    if mode == "nf4":
        for name, layer in targets:
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent), leaf, _nf4_linear(layer, layer.weight.device))
        return len(targets)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    chosen = {id(m) for _, m in targets}
    config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
    quantize_(module, config, filter_fn=lambda m, _fqn: id(m) in chosen)
    return len(targets)


def _nf4_linear(layer: nn.Linear, device: torch.device | str) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` holding ``layer``'s weights (computing in their dtype), on ``device``."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          compute_dtype=layer.weight.dtype, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(layer.weight.data.detach().cpu(), requires_grad=False, quant_type="nf4")
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.data.detach().clone(), requires_grad=False)
    return q.to(device)


def quantization_of(module: nn.Module) -> str:
    """The quantisation of ``module``'s block linears: ``none``, ``int8``, ``fp8`` or ``nf4`` (the first found)."""
    for m in module.modules():
        w = getattr(m, "weight", None)
        kind = _tensor_kind(w) if isinstance(w, torch.Tensor) else "none"
        if kind != "none":
            return kind
    return "none"


def _tensor_kind(t: torch.Tensor) -> str:
    """``nf4`` for a bitsandbytes 4-bit weight; for a torchao tensor subclass, ``int8`` or ``fp8`` by the dtype of
    its packed data; ``none`` for a plain tensor."""
    if type(t).__name__ == "Params4bit":
        return "nf4"
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return "none"
    dtypes = {getattr(t, n).dtype for n in t.__tensor_flatten__()[0] if isinstance(getattr(t, n), torch.Tensor)}
    if torch.int8 in dtypes:
        return "int8"
    if dtypes & {torch.float8_e4m3fn, torch.float8_e5m2}:
        return "fp8"
    return "none"


def is_quantized_layer(layer: nn.Module) -> bool:
    """Whether a (peft-wrapped) linear layer's base weight is quantised."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    w = getattr(base, "weight", None)
    return isinstance(w, torch.Tensor) and _tensor_kind(w) != "none"


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds in memory: a quantised weight counts its packed data and its scales (torchao inner
    tensors; bitsandbytes absmax and code), a sharded DTensor (FSDP2) its local shard, a plain tensor
    ``numel * element_size``."""
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return tensor_nbytes(local)
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not nn.Parameter and type(t) is not torch.Tensor:
        names, _ = flatten()
        return sum(tensor_nbytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
    state = getattr(t, "quant_state", None)
    extra = 0
    if state is not None:
        for part in (state.absmax, state.code, getattr(state, "state2", None) and state.state2.absmax,
                     getattr(state, "state2", None) and state.state2.code):
            if isinstance(part, torch.Tensor):
                extra += part.numel() * part.element_size()
    return t.numel() * t.element_size() + extra
