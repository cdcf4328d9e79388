"""What a run holds in memory, measured (issue 17 point 3): weight bytes by part and the peak per logging interval.

- :func:`weight_bytes`: bytes of the frozen base, the LoRA adapters, the optimizer state and (where the
  backbone's encoders are ``nn.Module`` s) the text encoders and codec. Quantised weights count their packed data
  and scales (:func:`focusdpo.quantization.tensor_nbytes`), so an int8 base weighs about a quarter of fp32. Under
  FSDP the parameters are sharded DTensors and the bytes are the main process's own shards.
- :class:`PeakMemory`: the peak since the last reading. CUDA: ``torch.cuda.max_memory_allocated`` (tensors, not
  the allocator's reserve), reset after each reading. CPU: the process's peak resident set (``VmHWM`` of
  ``/proc/self/status``), reset after each reading by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0);
  where that cannot be reset, the lifetime peak (``getrusage``), which only grows.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn

from focusdpo.quantization import tensor_nbytes

MIB = 2**20


def _module_bytes(module: nn.Module, trainable: bool | None = None) -> int:
    tensors = [p for p in module.parameters() if trainable is None or p.requires_grad == trainable]
    if trainable is not True:
        tensors += list(module.buffers())
    return sum(tensor_nbytes(t) for t in tensors)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state`` (0 before the first step: PyTorch optimizers fill it lazily)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += tensor_nbytes(value)
    return total


def weight_bytes(backbone: Any, optimizer: Any | None = None) -> dict[str, int]:
    """``{"frozen_base", "adapters", "optimizer_state", "encoders"}`` in bytes for a backbone with LoRA attached.

    frozen_base: the non-trainable parameters and buffers of ``backbone.trainable()``; adapters: its trainable
    ones; optimizer_state: :func:`optimizer_state_bytes`; encoders: the parameters of ``backbone.text_encoder``
    and ``backbone.codec`` that are modules (0 otherwise; an on-disk latent cache holds none)."""
    net = backbone.trainable()
    encoders = 0
    for name in ("text_encoder", "codec"):
        part = getattr(backbone, name, None)
        seen = set()
        for module in _modules_of(part):
            if id(module) not in seen:
                seen.add(id(module))
                encoders += _module_bytes(module)
    return {"frozen_base": _module_bytes(net, trainable=False), "adapters": _module_bytes(net, trainable=True),
            "optimizer_state": 0 if optimizer is None else optimizer_state_bytes(optimizer), "encoders": encoders}


def _modules_of(part: Any) -> list[nn.Module]:
    """``part`` itself when it is a module, else the modules among its attributes (one level: wrappers such as the
    latent cache hold the codec, the codec holds the VAE)."""
    if part is None:
        return []
    if isinstance(part, nn.Module):
        return [part]
    out = []
    for value in vars(part).values():
        if isinstance(value, nn.Module):
            out.append(value)
        elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.Tensor)):
            out += [v for v in vars(value).values() if isinstance(v, nn.Module)]
    return out


class PeakMemory:
    """Peak memory of ``device`` between readings, in MiB (see the module doc for what is measured)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        self._resettable = self.device.type == "cuda" or self._reset_rss()
        if self.device.type != "cuda" and not self._resettable:
            self.kind = "cpu_rss_lifetime"
        self.reset()

    @staticmethod
    def _reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            self._reset_rss()

    def read(self, reset: bool = True) -> float:
        """The peak since the last reset, in MiB; resets it for the next interval when ``reset``."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            peak = (_vm_hwm_kib() if self._resettable else lifetime) / 1024
        if reset:
            self.reset()
        return peak


def _vm_hwm_kib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def write_memory_report(run_dir: Path, parts: dict[str, int], peak_kind: str, step: int, cfg: Any) -> str:
    """Write ``<run_dir>/memory.json`` (weight bytes by part, the step they were read at, what ``peak_mem_mib``
    measures, the quantisation and optimizer) and return a one-line summary for the log."""
    import json

    report = {"step": step, "weight_bytes": parts, "peak_mem_mib": peak_kind,
              "quantization": cfg.model.quantization, "dtype": cfg.model.dtype,
              "optimizer": getattr(cfg.train, "optimizer", "adamw")}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(run_dir) / "memory.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(Path(run_dir) / "memory.json")
    sizes = ", ".join(f"{k.replace('_', ' ')} {v / MIB:.2f} MiB" for k, v in parts.items())
    return f"memory (step {step}): {sizes}; peak_mem_mib = {peak_kind}"
