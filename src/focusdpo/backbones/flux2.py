"""FLUX.2 backbone (``model.backbone: flux2``): native multi-reference FLUX.2 [klein] behind the Backbone contract.

FLUX.2 takes reference images natively: ``Flux2KleinPipeline(image=[ref_1, ..., ref_K])`` VAE-encodes each one
and appends its tokens to the target sequence, ``[text | target | ref_1 | ... | ref_K]``, every reference with
its own time coordinate. We build the very same sequence and RoPE ids (4 axes ``(T, H, W, L)``):

- text token ``l``: ``(0, 0, 0, l)`` (``_prepare_text_ids``);
- target token ``(i, j)``: ``(0, i, j, 0)`` (``_prepare_latent_ids``);
- reference ``k`` (0-based) token ``(i, j)``: ``(10 + 10 k, i, j, 0)`` (``_prepare_image_ids``, scale 10);

tested equal to the pipeline's helpers, so a LoRA trained here runs in the stock pipeline with ``image=[refs]``
(``focusdpo export-lora``). K may be 0 (text-to-image), as in the pipeline; the focus tap needs K >= 1.

Sampling follows the pipeline too (the backbone's diffusion convention, :class:`Flux2FlowMatching`): FLUX's flow
matching for training and the Euler update, with sigmas ``linspace(1, 1/n, n)`` shifted by the model's own
scheduler with ``mu = compute_empirical_mu(N, n)``, and the initial noise drawn as ``randn(B, C, h, w)`` then
packed, so the same seed gives the same image in both.

The codec is :class:`~focusdpo.backbones.flux2_vae.Flux2VAECodec`, the text encoder
:class:`~focusdpo.backbones.flux2_text.Flux2TextEncoder` (Qwen3, no pooled vector), the focus tap
:mod:`focusdpo.backbones.flux2_tap`; everything else (LoRA, reference model, tap layer names ``double:i``,
``single:i``, ``all``) is the FLUX.1 adapter's, which this class extends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from focusdpo.backbones import flux2_tap
from focusdpo.backbones.base import Codec, FocusTap, TextCond, TextEncoder, Tokens
from focusdpo.backbones.diffusion import FlowMatching
from focusdpo.backbones.flux import FluxInContext
from focusdpo.backbones.flux_tap import TapStore
from focusdpo.config import ModelConfig
from focusdpo.quantization import quantize_frozen

log = logging.getLogger(__name__)
REF_TIME_SCALE = 10  # Flux2KleinPipeline._prepare_image_ids(scale=10): reference k sits at T = 10 + 10 k
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _grid_ids(t: int, h: int, w: int) -> torch.Tensor:
    """``long [h * w, 4]`` ids ``(t, i, j, 0)`` in row-major order."""
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(ii, t), ii, jj, torch.zeros_like(ii)], dim=-1).reshape(h * w, 4)


def position_ids(grid: tuple[int, int], ref_grids: Sequence[tuple[int, int]],
                 device: torch.device | None = None) -> torch.Tensor:
    """RoPE ids ``long [N + sum M_k, 4]`` of the target grid then each reference grid (see the module doc)."""
    parts = [_grid_ids(0, *grid)]
    parts += [_grid_ids(REF_TIME_SCALE * (k + 1), h, w) for k, (h, w) in enumerate(ref_grids)]
    return torch.cat(parts).to(device)


def text_ids(length: int, device: torch.device | None = None) -> torch.Tensor:
    """RoPE ids ``long [L, 4]`` of the text tokens: ``(0, 0, 0, l)``."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


class Flux2FlowMatching(FlowMatching):
    """FLUX's flow matching with ``Flux2KleinPipeline``'s sampling schedule and initial noise (module doc).

    Args:
        scheduler: the model's ``FlowMatchEulerDiscreteScheduler`` (its shift settings make the sigmas).
    """

    def __init__(self, scheduler: object) -> None:
        self.scheduler = scheduler

    def sampling_sigmas(self, steps: int, n_tokens: int, shift: bool = True) -> torch.Tensor:
        """``float [steps + 1]`` from 1 to 0: ``Flux2KleinPipeline``'s schedule for ``n_tokens`` target tokens
        (``shift=False``: the unshifted ``linspace(1, 1/steps, steps)`` and a final 0)."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        if steps < 1:
            raise ValueError(f"sample.steps={steps} is invalid: allowed >= 1")
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if not shift:
            return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # set_timesteps mutates its state
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=compute_empirical_mu(n_tokens, steps))
        return scheduler.sigmas.float().cpu()

    def initial_noise(self, batch: int, grid: tuple[int, int], channels: int, seed: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """``float [B, h*w, C]``: ``randn(B, C, h, w)`` from a CPU generator seeded with ``seed``, packed row-major,
        the numbers ``Flux2KleinPipeline(generator=torch.Generator().manual_seed(seed))`` draws."""
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((batch, channels, *grid), generator=gen)
        return noise.flatten(2).transpose(1, 2).contiguous().to(device)

    def __repr__(self) -> str:
        return f"Flux2FlowMatching({type(self.scheduler).__name__})"


class Flux2InContext(FluxInContext):
    """The :class:`~focusdpo.backbones.base.Backbone` over a ``Flux2Transformer2DModel``; K = 0 references allowed.

    Args:
        transformer: the FLUX.2 transformer (``in_channels`` must equal ``codec.channels``, 128).
        codec: :class:`~focusdpo.backbones.flux2_vae.Flux2VAECodec` (or a cache around it).
        text_encoder: prompts -> ``TextCond`` with ``tokens`` of width ``joint_attention_dim``.
        scheduler: the model's ``FlowMatchEulerDiscreteScheduler`` (its shift settings make the sampling sigmas).
        tap_layer: as :class:`~focusdpo.backbones.flux.FluxInContext`.
        guidance: guidance-embedding value for guidance-distilled transformers (FLUX.2 [dev]); None for [klein].
    """

    text_to_image = True  # K = 0 references is allowed (text-to-image), as in the stock pipeline

    def __init__(self, transformer: nn.Module, codec: Codec, text_encoder: TextEncoder, scheduler: object,
                 tap_layer: str | int | None = None, guidance: float | None = None) -> None:
        cfg = transformer.config
        if cfg.in_channels != codec.channels:
            raise ValueError(f"transformer in_channels={cfg.in_channels} != codec channels {codec.channels}: "
                             f"the codec and the transformer come from different models")
        if text_encoder.dim != cfg.joint_attention_dim:
            raise ValueError(f"text encoder width {text_encoder.dim} != transformer joint_attention_dim "
                             f"{cfg.joint_attention_dim}: the text encoder belongs to another model")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("the transformer has guidance embeddings (FLUX.2 [dev]): set model.flux2.guidance, "
                             "e.g. 4.0")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(f"model.flux2.guidance={guidance} but the transformer has no guidance embedding "
                             f"(FLUX.2 [klein]): set model.flux2.guidance=null")
        self.transformer, self.codec, self.text_encoder = transformer, codec, text_encoder
        self.scheduler, self.guidance, self.patch = scheduler, guidance, codec.patch
        self.diffusion = Flux2FlowMatching(scheduler)
        self._store = TapStore()
        self.block_names = flux2_tap.install(transformer, self._store)
        self._tap_blocks: list[str] = []
        self.tap_layer = tap_layer

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCond, refs: Sequence[Tokens],
                grid: tuple[int, int], tap: bool = False, ref_masks: Sequence[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, FocusTap | None]:
        """See :meth:`Backbone.predict`; K = 0 references is allowed without ``tap``."""
        self._check_inputs(x_t, t, text, refs, grid, tap)
        dtype, device = self.dtype, self.device
        seq = torch.cat([x_t] + [r.tokens for r in refs], dim=1).to(device, dtype)
        text_len = text.tokens.shape[1]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x_t.shape[0],), float(self.guidance), device=device, dtype=dtype)
        with self._tap_session(tap, text_len, x_t.shape[1], refs, ref_masks) as (hidden, fields):
            out = self.transformer(hidden_states=seq, encoder_hidden_states=text.tokens.to(device, dtype),
                                   timestep=t.to(device, dtype), img_ids=position_ids(grid, [r.grid for r in refs],
                                                                                      device),
                                   txt_ids=text_ids(text_len, device), guidance=guidance, return_dict=False)[0]
        pred = out[:, : x_t.shape[1]].to(x_t.dtype)
        if not tap:
            return pred, None
        return pred, FocusTap.from_blocks(hidden.value(), hidden.count, fields, x_t.shape[1], [r.grid for r in refs],
                                          self._tap_blocks)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCond, refs: Sequence[Tokens],
                      grid: tuple[int, int], tap: bool = False) -> None:
        if tap and not refs:
            raise ValueError("predict: the focus tap needs K >= 1 references (it measures attention on them)")
        if refs:
            super()._check_inputs(x_t, t, text, refs, grid)
            return
        if x_t.ndim != 3 or x_t.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"predict: x_t of shape {tuple(x_t.shape)} does not fit grid {grid}")
        if t.shape != (x_t.shape[0],) or len(text) != x_t.shape[0]:
            raise ValueError(f"predict: t {tuple(t.shape)} and text batch {len(text)} must match batch "
                             f"{x_t.shape[0]}")


def load_flux2(cfg: ModelConfig, device: torch.device | str | None = None) -> Flux2InContext:
    """Load FLUX.2 from ``cfg.checkpoint`` (diffusers folder or hub id with ``transformer/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``) onto ``device`` (default CPU), frozen.

    Uses ``cfg.dtype``, ``cfg.patch`` (must be the VAE token size, 16), ``cfg.max_text_tokens`` and the section
    ``model.flux2`` (``guidance``, ``offload_encoders``, ``latent_cache``) as the FLUX.1 loader does.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from focusdpo.backbones.flux2_text import Flux2TextEncoder
    from focusdpo.backbones.flux2_vae import Flux2VAECodec
    from focusdpo.backbones.flux_text import TextCache
    from focusdpo.backbones.vae import LatentCache

    if not cfg.checkpoint:
        raise ValueError("model.checkpoint is required for model.backbone=flux2: a local diffusers FLUX.2 folder "
                         "(transformer/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id, e.g. "
                         "black-forest-labs/FLUX.2-klein-base-4B")
    opts = cfg.options  # model.flux2 (Flux2Options)
    device, dtype = torch.device(device or "cpu"), DTYPES[cfg.dtype]
    transformer = Flux2Transformer2DModel.from_pretrained(cfg.checkpoint, subfolder="transformer", torch_dtype=dtype,
                                                          use_safetensors=True)
    transformer.requires_grad_(False).eval()
    quantize_frozen(transformer, cfg.quantization)  # on the CPU, before the move: the device never holds bf16
    transformer.to(device)
    codec = Flux2VAECodec.from_pretrained(cfg.checkpoint, dtype=dtype, device=device, offload=opts.offload_encoders)
    if cfg.patch != codec.patch:
        raise ValueError(f"model.patch={cfg.patch} but the VAE of {cfg.checkpoint} makes {codec.patch}-pixel tokens: "
                         f"set model.patch={codec.patch}")
    text = Flux2TextEncoder.from_pretrained(cfg.checkpoint, max_tokens=cfg.max_text_tokens, dtype=dtype,
                                            device=device, offload=opts.offload_encoders)
    if opts.latent_cache:
        codec, text = LatentCache(codec, opts.latent_cache), TextCache(text, opts.latent_cache)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(cfg.checkpoint, subfolder="scheduler")
    return Flux2InContext(transformer, codec, text, scheduler, guidance=opts.guidance)
