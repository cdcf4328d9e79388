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

A run with an imported UNO LoRA (``model.flux.lora_import``) trained on top of UNO merged into the base, so
:func:`export_run` writes UNO's adapter and ours as ONE LoRA (:func:`combine_lora_state_dicts`): for a
module both touch ``A' = [A_uno; A_ours]`` and ``B' = [B_uno | s_ours B_ours]``, so ``B' @ A'`` is the sum of
the two updates; a module only one of them touches gets that one alone. Every module is zero-padded to one
rank, so readers that take ``alpha = rank`` for the whole file (older diffusers: no per-module alpha) still
apply scale 1. ``FluxPipeline`` on the plain FLUX base plus this file reproduces the trained model.
``export_run(..., fmt="uno")`` writes the same sum in UNO's own processor naming (``dit_lora.safetensors``,
:func:`focusdpo.backbones.uno.diffusers_to_uno_state_dict`) for UNO's inference scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNO_WEIGHT_NAME = "dit_lora.safetensors"
FORMATS = ("diffusers", "uno")
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


def combine_lora_state_dicts(*parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale-folded LoRAs of one model -> one LoRA whose update is their sum, at scale 1.

    Each part maps ``<module>.lora_A.weight`` ``[r_i, in]`` and ``.lora_B.weight`` ``[out, r_i]`` (scale already
    in ``lora_B``). Per module, ranks are concatenated, ``A' = [A_1; A_2; ...]``, ``B' = [B_1 | B_2 | ...]``, so
    ``B' @ A' = sum_i B_i @ A_i``; then every module is zero-padded (zero rows of ``A'``, zero columns of ``B'``)
    to the largest combined rank R, so a reader that assumes ``alpha = R`` everywhere gets scale 1. Raises if
    two parts give one module different ``in``/``out`` sizes.
    """
    merged: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for part in parts:
        for key, a in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            b = part[f"{module}.lora_B.weight"]
            downs, ups = merged.setdefault(module, ([], []))
            if downs and (downs[0].shape[1], ups[0].shape[0]) != (a.shape[1], b.shape[0]):
                raise ValueError(f"LoRA parts disagree on {module!r}: [out, in] {[ups[0].shape[0], downs[0].shape[1]]}"
                                 f" vs {[b.shape[0], a.shape[1]]}; they are not for the same model")
            downs.append(a.float())
            ups.append(b.float())
    if not merged:
        raise ValueError("combine_lora_state_dicts: no <module>.lora_A.weight key in any part")
    rank = max(sum(a.shape[0] for a in downs) for downs, _ in merged.values())
    out = {}
    for module, (downs, ups) in merged.items():
        a, b = torch.cat(downs), torch.cat(ups, dim=1)
        pad = rank - a.shape[0]
        out[f"{module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    return out


def run_uno_lora(run_dir: str | Path) -> str | None:
    """The UNO LoRA a run merged into its base (``model.flux.lora_import`` of ``<run>/config.yaml``; flat
    ``model.lora_import`` in configs written before the per-backbone sections), or None."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    from focusdpo.config import ConfigError, load_config

    try:
        return getattr(load_config(path).model.options, "lora_import", None)
    except ConfigError:  # e.g. an objective registered by a plugin this process has not imported
        import yaml

        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        if not isinstance(model, dict):
            return None
        section = model.get("flux")
        return (section or {}).get("lora_import") if isinstance(section, dict) else model.get("lora_import")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
               fmt: str = "diffusers", uno_lora: str | Path | None = None) -> Path:
    """Convert a finished run's ``lora.safetensors`` (rank and alpha in its metadata) for other tools, in
    ``out_dir`` (default: the run folder itself, so ``FluxPipeline.load_lora_weights(run_dir)`` works).
    No model is loaded.

    The run's UNO LoRA (``uno_lora``; default: ``model.flux.lora_import`` of ``<run>/config.yaml``) is combined
    with ours (:func:`combine_lora_state_dicts`), so the file reproduces the trained model on the plain base.
    ``fmt``: ``diffusers`` (``pytorch_lora_weights.safetensors``) or ``uno`` (``dit_lora.safetensors`` in
    UNO's processor naming, every pair at one rank, stored in the metadata as ``rank``).
    """
    from safetensors import safe_open

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid: allowed {', '.join(FORMATS)}")
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
    ours = scaled_lora_state_dict(state, float(meta["alpha"]) / float(meta["rank"]))
    uno_lora = uno_lora if uno_lora is not None else run_uno_lora(run_dir)
    from focusdpo.backbones import uno as uno_format

    try:
        uno_sd = uno_format.load_uno_lora_file(uno_lora) if uno_lora else {}
    except uno_format.UnoLoraError as e:
        raise uno_format.UnoLoraError(f"{e} (the run's UNO LoRA, which the export combines with ours: give its "
                                      f"path with --uno-lora)") from e
    if fmt == "uno":
        sd, rank = uno_format.diffusers_to_uno_state_dict(ours, uno_sd)
        return _write_uno(sd, rank, out_dir or run_dir, dtype)
    if uno_sd:
        uno_peft = uno_format.uno_to_peft_state_dict(uno_sd, *uno_format.uno_block_counts(uno_sd))
        ours = combine_lora_state_dicts(uno_peft, ours)
    return _write(ours, out_dir or run_dir, dtype)


def _write_uno(state: dict[str, torch.Tensor], rank: int, out_dir: str | Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / UNO_WEIGHT_NAME
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "uno", "rank": str(rank)})
    return path


def _write(state: dict[str, torch.Tensor], out_dir: str | Path, dtype: torch.dtype) -> Path:
    from diffusers import FluxPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers={k: v.to(dtype) for k, v in state.items()},
                                   weight_name=WEIGHT_NAME)
    return out_dir / WEIGHT_NAME


PIPELINES = {"flux": "FluxPipeline", "flux2": "Flux2KleinPipeline"}  # backbone -> the stock pipeline of its export


def has_diffusers_pipeline(model: Any) -> bool:
    """Whether the run's backbone (``model``: its ModelConfig) exports a LoRA that a stock diffusers pipeline loads."""
    return model.backbone in PIPELINES


def pipeline_snippet(model: Any, where: str) -> str:
    """Markdown telling a user how to load an exported LoRA (``where``: a folder or hub id) with the stock
    pipeline of the run's backbone (``model``: the run's :class:`~focusdpo.config.ModelConfig`); for a model card."""
    base = model.checkpoint or "<base model folder or hub id>"
    if model.backbone == "flux2":
        return (f'```python\nimport torch\nfrom diffusers import Flux2KleinPipeline\nfrom PIL import Image\n\n'
                f'pipe = Flux2KleinPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")\n'
                f'pipe.load_lora_weights("{where}")\n'
                f'refs = [Image.open("subject1.png"), Image.open("subject2.png")]\n'
                f'image = pipe("a photo of ...", image=refs).images[0]\n```')
    if model.backbone == "flux":
        note = ""
        imported = getattr(model.options, "lora_import", None)
        if imported:
            note = (f"\nThe base was trained with UNO's LoRA merged in (`model.flux.lora_import: {imported}`); the "
                    f"file `focusdpo export-lora` writes holds UNO's adapter and this one together (ranks "
                    f"concatenated), so loading it alone reproduces the trained model.\n")
        return (f'```python\nimport torch\nfrom diffusers import FluxPipeline\n\n'
                f'pipe = FluxPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")\n'
                f'pipe.load_lora_weights("{where}")\nimage = pipe("a photo of ...").images[0]\n```\n{note}\n'
                f"`FluxPipeline` takes no reference images; sample with references through `focusdpo sample`.")
    fetch = ""
    if not Path(where).exists():  # a hub repo id: download the folder first
        fetch, where = f"hf download {where} --local-dir {where.rsplit('/', 1)[-1]}\n", where.rsplit("/", 1)[-1]
    return (f"The {model.backbone} backbone has no diffusers pipeline; sample it with focusdpo:\n\n"
            f"```bash\n{fetch}focusdpo sample --run {where} --n 8 --subjects 2 --out samples.png\n```")
