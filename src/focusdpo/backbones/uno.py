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
        raise UnoLoraError(f"model.flux.lora_import={str(path)!r}: expected a .safetensors file (UNO's dit_lora)")
    if not path.is_file():
        raise UnoLoraError(f"model.flux.lora_import={str(path)!r} does not exist: give the path of "
                           f"dit_lora.safetensors")
    return load_file(str(path))


def uno_block_counts(state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(double blocks, single blocks)`` a UNO state dict reaches: the highest block index + 1 of each kind."""
    counts = {"double_blocks": 0, "single_blocks": 0}
    for key in state_dict:
        m = _KEY.match(key)
        if m is None:
            raise UnoLoraError(f"{key!r} is not a UNO LoRA key: expected "
                               f"'<double|single>_blocks.<i>.processor.<pair>.<down|up>.weight'")
        counts[m.group(1)] = max(counts[m.group(1)], int(m.group(2)) + 1)
    return counts["double_blocks"], counts["single_blocks"]


def _group_parts(kind: str, idx: int, pair: str, uno: dict[str, torch.Tensor],
                 ours: dict[str, torch.Tensor], used: set[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(down [r, in], up [out_total, r])`` parts of one UNO processor pair: UNO's own, then one per
    diffusers module of ``ours`` it covers (its ``lora_B`` placed in that module's rows of the fused output)."""
    parts = []
    key = f"{kind}.{idx}.processor.{pair}"
    if f"{key}.down.weight" in uno:
        parts.append((uno[f"{key}.down.weight"].float(), uno[f"{key}.up.weight"].float()))
    targets = (DOUBLE_PAIRS if kind == "double_blocks" else SINGLE_PAIRS)[pair]
    prefix = ("transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks") + f".{idx}."
    for j, name in enumerate(targets):
        a_key, b_key = f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"
        if a_key not in ours:
            continue
        a, b = ours[a_key].float(), ours[b_key].float()
        up = torch.zeros(b.shape[0] * len(targets), b.shape[1])
        up[j * b.shape[0]:(j + 1) * b.shape[0]] = b  # q, k, v are equal thirds of the fused rows (K outermost)
        parts.append((a, up))
        used |= {a_key, b_key}
    return parts


def diffusers_to_uno_state_dict(ours: dict[str, torch.Tensor], uno: dict[str, torch.Tensor] | None = None
                                ) -> tuple[dict[str, torch.Tensor], int]:
    """Write a LoRA back in UNO's processor naming (the inverse of :func:`uno_to_diffusers_pairs`).

    ``ours``: diffusers-naming pairs with the scale folded into ``lora_B`` (``<module>.lora_A.weight`` ``[r, in]``,
    ``.lora_B.weight`` ``[out, r]``, scale 1); ``uno``: an optional UNO state dict added on top (the one merged
    at training time). Each UNO pair holds the sum of its parts by concatenating ranks: ``down = [down_uno;
    A_q; A_k; A_v]`` and ``up = [up_uno | B_q in the q rows | B_k in the k rows | B_v in the v rows]``, so
    ``up @ down`` is exactly UNO's update plus ours. UNO's inference builds every processor with one
    ``lora_rank``: every pair is zero-padded to the largest rank R, and every block up to the highest index
    gets all of its pairs, zeros where nothing adds to one, so the file is complete as UNO saves it. The shape
    of a pair no block has (e.g. the single blocks' ``proj_lora`` when neither UNO nor ``lora.targets``
    covers ``proj_out``) follows from the width D: ``D -> 3D`` (qkv), ``D -> D`` (proj), ``D + 4D -> D``
    (single ``proj_lora``: FLUX's single-block MLP is 4D wide, ``mlp_ratio=4`` in diffusers). Returns
    ``(state dict, R)``.

    Raises :class:`UnoLoraError` naming the modules of ``ours`` that UNO's processors cannot hold (UNO adds
    LoRA to attention q/k/v/out and the single blocks' ``proj_out`` only: not ``ff``, ``proj_mlp``, norms or
    the final ``proj_out``).
    """
    uno = uno or {}
    if uno:
        _check_keys(uno, *uno_block_counts(uno), require_all_blocks=False)
    idx_re = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
    n = dict(zip(("double_blocks", "single_blocks"), uno_block_counts(uno) if uno else (0, 0), strict=True))
    for key in ours:
        m = idx_re.match(key)
        if m:
            kind = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
            n[kind] = max(n[kind], int(m.group(2)) + 1)
    groups, used = {}, set()
    for kind, pairs in (("double_blocks", DOUBLE_PAIRS), ("single_blocks", SINGLE_PAIRS)):
        for i in range(n[kind]):
            for pair in pairs:
                parts = _group_parts(kind, i, pair, uno, ours, used)
                if parts:
                    groups[(kind, i, pair)] = (torch.cat([d for d, _ in parts]), torch.cat([u for _, u in parts], 1))
    left = sorted(k.rsplit(".lora_", 1)[0] for k in set(ours) - used if ".lora_A." in k)
    if left:
        raise UnoLoraError(f"{len(left)} LoRA module(s) have no place in UNO's processors (attention q/k/v/out and "
                           f"single-block proj_out only): {left[:10]}{' ...' if len(left) > 10 else ''}; export in "
                           f"diffusers format instead, or train with lora.targets inside that set")
    if not groups:
        raise UnoLoraError("nothing to write: neither our LoRA nor a UNO LoRA covers a FLUX block")
    rank = max(d.shape[0] for d, _ in groups.values())
    seen = {(kind, pair): (d.shape[1], u.shape[0]) for (kind, _, pair), (d, u) in groups.items()}
    (kind, pair), (fan_in, fan_out) = next(iter(seen.items()))
    width = fan_in if pair.startswith("qkv") else fan_out
    shapes = {(k, p): (width, 3 * width) if p.startswith("qkv") else (width, width)
              for k, pairs in (("double_blocks", DOUBLE_PAIRS), ("single_blocks", SINGLE_PAIRS)) for p in pairs}
    shapes[("single_blocks", "proj_lora")] = (width + 4 * width, width)
    shapes.update(seen)
    out = {}
    for (kind, pair), (fan_in, fan_out) in sorted(shapes.items()):
        for i in range(n[kind]):
            down, up = groups.get((kind, i, pair), (torch.zeros(0, fan_in), torch.zeros(fan_out, 0)))
            pad = rank - down.shape[0]
            key = f"{kind}.{i}.processor.{pair}"
            out[f"{key}.down.weight"] = torch.cat([down, torch.zeros(pad, fan_in)]).contiguous()
            out[f"{key}.up.weight"] = torch.cat([up, torch.zeros(fan_out, pad)], 1).contiguous()
    return out, rank
