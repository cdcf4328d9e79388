"""In-context FLUX backbone (UNO-style), tiny and full size: the same adapter class runs both.

The sequence fed to ``diffusers.FluxTransformer2DModel`` is ``[text | target | ref_1 | ... | ref_K]``:
noisy target tokens followed by the clean tokens of K >= 1 references (any sizes), all sharing the
timestep embedding. Position ids (RoPE axes ``(index, row, col)``): text at ``(0, 0, 0)``, target token
``(i, j)`` at ``(0, i, j)``, reference k token ``(i, j)`` at ``(0, i + o_k, j + o_k)`` with diagonal offsets
``o_1 = max(h, w)`` and ``o_{k+1} = o_k + max(h_k, w_k)``, so references never share a position with the target
or with each other (UNO's universal rotary embedding, simplified to one diagonal shift).

The focus tap (``predict(..., tap=True)``) returns a :class:`~focusdpo.backbones.base.FocusTap` from the same
forward pass: the image-stream output of the tapped block(s) (a forward hook) and their attention field,
computed inside the attention processor (:mod:`focusdpo.backbones.flux_tap`). ``tap_layer`` names one block
(``double:i``, ``single:i``) or ``all`` (mean over every block).

The timestep convention follows the diffusers pipeline: we pass sigma in ``[0, 1]``; the model multiplies
it by 1000 internally.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from focusdpo import lora as lora_utils
from focusdpo.backbones import flux_tap
from focusdpo.backbones.base import Codec, FocusTap, TextCond, TextEncoder, Tokens
from focusdpo.backbones.codecs import PixelCodec
from focusdpo.backbones.diffusion import FLOW, Diffusion
from focusdpo.backbones.text import TinyTextEncoder
from focusdpo.config import ModelConfig
from focusdpo.quantization import quantize_frozen


def position_ids(grid: tuple[int, int], ref_grids: Sequence[tuple[int, int]], device: torch.device | None = None
                 ) -> torch.Tensor:
    """RoPE ids ``long [N + sum M_k, 3]`` of the target grid followed by each reference grid (see module doc)."""
    def block(h: int, w: int, offset: int) -> torch.Tensor:
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([torch.zeros_like(ii), ii + offset, jj + offset], dim=-1).reshape(h * w, 3)

    parts = [block(*grid, 0)]
    offset = max(grid)
    for h, w in ref_grids:
        parts.append(block(h, w, offset))
        offset += max(h, w)
    return torch.cat(parts).to(device)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axis split of ``head_dim`` in FLUX's proportions (16, 56, 56 for 128); every part even."""
    if head_dim < 8 or head_dim % 2:
        raise ValueError(f"model.flux-tiny.head_dim={head_dim} is invalid for RoPE: allowed an even number >= 8")
    a = (head_dim * 7 // 16) // 2 * 2
    return head_dim - 2 * a, a, a


class FluxInContext:
    """The :class:`~focusdpo.backbones.base.Backbone` over a ``FluxTransformer2DModel``.

    Args:
        transformer: the FLUX transformer (``in_channels`` must equal ``codec.channels``).
        codec: images <-> tokens (pixel patchify for the tiny model, the VAE for FLUX).
        text_encoder: prompts -> ``TextCond`` whose widths match ``joint_attention_dim`` and
            ``pooled_projection_dim``.
        tap_layer: the block(s) of the focus tap (:func:`~focusdpo.backbones.flux_tap.parse_tap_layer`:
            ``"double:i"``, ``"single:i"``, ``"all"``; None = the middle double-stream block).
        guidance: guidance-embedding value for guidance-distilled models (FLUX.1-dev); must be None otherwise.
    """

    def __init__(self, transformer: FluxTransformer2DModel, codec: Codec, text_encoder: TextEncoder,
                 tap_layer: str | int | None = None, guidance: float | None = None) -> None:
        cfg = transformer.config
        if cfg.in_channels != codec.channels:
            raise ValueError(f"transformer in_channels={cfg.in_channels} != codec channels {codec.channels}: "
                             f"the codec and the transformer come from different models")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("the transformer has guidance embeddings (FLUX.1-dev): pass guidance, e.g. 3.5")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(f"guidance={guidance} given but the transformer has no guidance embedding")
        self.transformer = transformer
        self.codec = codec
        self.text_encoder = text_encoder
        self.guidance = guidance
        self.patch = codec.patch
        self.diffusion: Diffusion = FLOW  # FLUX's flow matching (focusdpo.backbones.diffusion)
        self._store = flux_tap.TapStore()
        self.block_names = flux_tap.install(transformer, self._store)
        self._tap_blocks: list[str] = []
        self._position_ids: dict[tuple, torch.Tensor] = {}
        self.tap_layer = tap_layer

    @property
    def tap_layer(self) -> str:
        """The tapped block(s): ``"double:i"``, ``"single:i"`` or ``"all"``."""
        return "all" if len(self._tap_blocks) > 1 else self._tap_blocks[0]

    @tap_layer.setter
    def tap_layer(self, spec: str | int | None) -> None:
        n_double, n_single = len(self.transformer.transformer_blocks), len(self.transformer.single_transformer_blocks)
        self._tap_blocks = flux_tap.parse_tap_layer(spec, n_double, n_single)

    @property
    def tap_blocks(self) -> list[str]:
        """Names of the tapped blocks (one, or every block for ``"all"``)."""
        return list(self._tap_blocks)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.codec.token_grid(size)

    def encode_images(self, images: torch.Tensor) -> Tokens:
        return self.codec.encode(images.to(self.device))

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.codec.decode(tokens, grid)

    def encode_prompts(self, prompts: Sequence[str]) -> TextCond:
        return self.text_encoder.encode(list(prompts))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCond, refs: Sequence[Tokens],
                grid: tuple[int, int], tap: bool = False, ref_masks: Sequence[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, FocusTap | None]:
        """See :meth:`Backbone.predict`: ``pred [B, N, C]`` and, with ``tap``, a :class:`FocusTap`."""
        self._check_inputs(x_t, t, text, refs, grid)
        dtype, device = self.dtype, self.device
        seq = torch.cat([x_t] + [r.tokens for r in refs], dim=1).to(device, dtype)
        key = (tuple(grid), tuple(tuple(r.grid) for r in refs), str(device))
        if key not in self._position_ids:  # constant per layout: built once, not at every sampler step
            self._position_ids[key] = position_ids(grid, [r.grid for r in refs], device)
        img_ids = self._position_ids[key]
        txt_ids = torch.zeros(text.tokens.shape[1], 3, device=device)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x_t.shape[0],), float(self.guidance), device=device, dtype=dtype)
        with self._tap_session(tap, text.tokens.shape[1], x_t.shape[1], refs, ref_masks) as (hidden, fields):
            out = self.transformer(hidden_states=seq, encoder_hidden_states=text.tokens.to(device, dtype),
                                   pooled_projections=text.pooled.to(device, dtype), timestep=t.to(device, dtype),
                                   img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        pred = out[:, : x_t.shape[1]].to(x_t.dtype)
        if not tap:
            return pred, None
        return pred, FocusTap.from_blocks(hidden.value(), hidden.count, fields, x_t.shape[1], [r.grid for r in refs],
                                          self._tap_blocks)

    def _tap_session(self, tap: bool, text_len: int, n_target: int, refs: Sequence[Tokens],
                     ref_masks: Sequence[torch.Tensor] | None) -> AbstractContextManager:
        """:func:`~focusdpo.backbones.flux_tap.armed` for a tapped forward; a no-op yielding empty results else."""
        if not tap:
            return nullcontext((flux_tap.RunningMean(), {}))
        masks = flux_tap.tap_masks([r.tokens for r in refs], ref_masks, self.device)
        return flux_tap.armed(self._store, self.transformer, self._tap_blocks, text_len, n_target, masks)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCond, refs: Sequence[Tokens],
                      grid: tuple[int, int]) -> None:
        b = x_t.shape[0]
        if x_t.ndim != 3 or x_t.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"predict: x_t of shape {tuple(x_t.shape)} does not fit grid {grid}")
        if len(refs) < 1:
            raise ValueError("predict: at least one reference is required (K >= 1)")
        for k, r in enumerate(refs):
            if r.tokens.shape[0] != b or r.tokens.shape[2] != x_t.shape[2]:
                raise ValueError(f"predict: reference {k} tokens {tuple(r.tokens.shape)} do not match x_t "
                                 f"{tuple(x_t.shape)} in batch or channels")
        if t.shape != (b,) or len(text) != b:
            raise ValueError(f"predict: t {tuple(t.shape)} and text batch {len(text)} must match batch {b}")

    def trainable(self) -> nn.Module:
        return self.transformer

    def reference(self) -> AbstractContextManager[None]:
        return lora_utils.adapters_disabled(self.transformer)

    def add_lora(self, cfg: object) -> int:
        """Attach LoRA (``cfg``: :class:`~focusdpo.config.LoraConfig`) to the transformer; returns its size."""
        return lora_utils.attach_lora(self.transformer, cfg)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return lora_utils.lora_state_dict(self.transformer)

    def load_lora_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        lora_utils.load_lora_state_dict(self.transformer, state_dict)


# --- the built-in tiny model: construction and its single-file checkpoint -------------------------------------

TINY_FORMAT = "focusdpo-flux-tiny-v1"
ARCH_FIELDS = ("patch", "num_layers", "num_single_layers", "num_heads", "head_dim", "text_dim", "max_text_tokens")
_SHARED = ("patch", "max_text_tokens")  # model.*; the others are model.flux-tiny.*


def tiny_arch(cfg: ModelConfig) -> dict[str, int]:
    """The architecture fields of a flux-tiny config (``model.patch``, ``model.max_text_tokens`` and the section
    ``model.flux-tiny``), by name."""
    return {f: getattr(cfg if f in _SHARED else cfg.options, f) for f in ARCH_FIELDS}


def _arch_key(field: str) -> str:
    return f"model.{field}" if field in _SHARED else f"model.flux-tiny.{field}"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny(cfg: ModelConfig, vocabulary: Sequence[str], device: torch.device | str | None = None
               ) -> FluxInContext:
    """A freshly initialised tiny backbone: pixel codec, :class:`TinyTextEncoder` over ``vocabulary``."""
    a = cfg.options  # model.flux-tiny (FluxTinyOptions)
    codec = PixelCodec(cfg.patch)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=codec.channels, num_layers=a.num_layers,
        num_single_layers=a.num_single_layers, attention_head_dim=a.head_dim,
        num_attention_heads=a.num_heads, joint_attention_dim=a.text_dim, pooled_projection_dim=a.text_dim,
        guidance_embeds=False, axes_dims_rope=rope_axes(a.head_dim))
    text = TinyTextEncoder(vocabulary, dim=a.text_dim, max_tokens=cfg.max_text_tokens)
    dtype = _DTYPES[cfg.dtype]
    if dtype != torch.float32:
        transformer.to(dtype=dtype)
    transformer.to(device=device)
    text.to(device=device)
    return FluxInContext(transformer, codec, text)


def save_tiny(backbone: FluxInContext, path: str | Path, cfg: ModelConfig) -> None:
    """Write the tiny model (transformer + text encoder, no LoRA) to one safetensors file, atomically.

    The metadata holds the architecture fields of ``cfg`` and the vocabulary, so the file alone rebuilds it.
    """
    if lora_utils.has_lora(backbone.transformer):
        raise ValueError("save_tiny: the transformer carries LoRA adapters; save them with lora_state_dict")
    tensors = {f"transformer.{k}": v for k, v in backbone.transformer.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in backbone.text_encoder.state_dict().items()})
    meta = {"format": TINY_FORMAT, "arch": json.dumps(tiny_arch(cfg)),
            "vocabulary": json.dumps(backbone.text_encoder.vocabulary)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def read_tiny_metadata(path: str | Path) -> tuple[dict[str, int], list[str]]:
    """``(arch fields, vocabulary)`` stored in a tiny checkpoint file."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != TINY_FORMAT:
        raise ValueError(f"{path} is not a flux-tiny checkpoint (format {meta.get('format')!r}, expected "
                         f"{TINY_FORMAT!r}): pass a file or folder written by `focusdpo pretrain`")
    return json.loads(meta["arch"]), json.loads(meta["vocabulary"])


def load_tiny(path: str | Path, cfg: ModelConfig, device: torch.device | str | None = None) -> FluxInContext:
    """Load a tiny checkpoint; its architecture must equal ``cfg``'s (else the error names the fields to set)."""
    arch, vocabulary = read_tiny_metadata(path)
    mine = tiny_arch(cfg)
    diff = {f: (arch[f], mine[f]) for f in ARCH_FIELDS if arch[f] != mine[f]}
    if diff:
        fix = " ".join(f"{_arch_key(f)}={ck}" for f, (ck, _) in diff.items())
        raise ValueError(f"checkpoint {path} was built with a different architecture {diff} "
                         f"(checkpoint, config): set {fix} or use a matching checkpoint")
    backbone = build_tiny(cfg, vocabulary)
    tensors = load_file(str(path))
    parts = {"transformer": backbone.transformer, "text_encoder": backbone.text_encoder}
    for name, module in parts.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        module.load_state_dict(sd, strict=True)
        module.to(device=device)
    backbone.transformer.requires_grad_(False)
    backbone.text_encoder.requires_grad_(False)
    quantize_frozen(backbone.transformer, cfg.quantization)
    return backbone
