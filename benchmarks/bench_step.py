"""Training-step cost of SFT, Diffusion-DPO (W = 1) and FocusDPO side by side, on the same inputs.

For every case (references K, gradient checkpointing, eager or ``compile_repeated_blocks``) each objective runs
the trainer's step -- ``focusdpo.train.step.pair_step``, backward, AdamW on the LoRA -- on the same pair batch
and the same noise, after warm-up steps; the median over ``--iters`` steps is reported with the peak memory,
the FocusDPO/DPO time ratio and the model-FLOP utilisation (MFU). Objectives: ``sft``; ``dpo``, Diffusion-DPO
(W = 1; ``pair_step`` runs it without the focus tap); ``focusdpo`` with the default focus (the attention-field
readout over every block, ``focus.readout=attention focus.tap_layer=all``); ``focusdpo-cosine``, the first
implementation's readout (hidden-state cosine of the middle double-stream block). The FocusDPO/DPO column
gives each focusdpo row's time over the dpo row's. The objectives' steps interleave
(one step of each in turn), so a change in the machine's load hits all of them alike.

Presets:

- ``cpu-tiny`` (default): the tiny *real* stack -- diffusers ``FluxTransformer2DModel``, ``AutoencoderKL``,
  T5 and CLIP at tiny sizes, written to a temp folder and loaded through ``load_backbone`` -- fp32 on the
  CPU, 64x64 target and 64x64 references (4x4 tokens each), 32 T5 tokens.
- ``flux-dev``: the FLUX.1-dev transformer architecture (11.9B) at random weights in bf16 on CUDA, 512x512
  target and references (1024 tokens each), 512 text tokens; the FLUX VAE architecture at random weights;
  text features from a fixed random stand-in for T5-XXL + CLIP-L (a per-prompt cost, the same for every
  objective). Needs about 45 GiB without checkpointing.
- ``flux-dev-24gb``: the ``flux-dev`` stack as a 24 GB card trains it (issue 17): the frozen transformer blocks
  quantised (``--quantization``, default nf4 on CUDA; int8 on a CPU, where bitsandbytes' 4-bit path is refused),
  built block by block on the device at random weights so the bf16 model never exists there, gradient
  checkpointing on, 8-bit AdamW (``--optimizer``), the VAE behind the latent cache; K = 1 and 2, 512 and 1024 px
  targets (``--sizes``). FLOPs are not counted (the count runs a step without checkpointing, which does not fit).
  A CPU smoke run at a tiny size (``tests/test_bench_step.py``): ``--device cpu --dtype float32 --layers 1 1
  --heads 1 --sizes 32 --text-tokens 8``.
- ``flux2-klein-4b``: the FLUX.2 [klein] 4B transformer architecture (5 double + 20 single blocks, 3072 wide,
  128-channel tokens) at random weights in bf16 on CUDA behind the ``flux2`` backbone (native multi-reference
  sequence, FLUX.2 focus tap), 512x512 target and references, 512 text tokens from a fixed random stand-in for
  the Qwen3-4B features (7680 wide, no pooled vector); the FLUX.2 VAE architecture at random weights. LoRA r16
  on the targets of ``configs/flux2-klein.yaml`` (double-stream attention + single-stream ``to_qkv_mlp_proj``).

Both presets put the VAE behind :class:`focusdpo.backbones.vae.LatentCache` (``model.flux.latent_cache``, the
recommended setting): after warm-up every image is a cache hit, so the step times measure the transformer,
the focus and the optimizer. ``--no-latent-cache`` times the VAE encode inside every step instead.

Model FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one eager step without
checkpointing (matmuls and attention: the no-grad reference forward, the policy forward and backward, SPAF);
recomputation under checkpointing is not model FLOPs. MFU = FLOPs / step time / peak, with the peak from
``--peak-tflops`` (default on CUDA: 989, dense bf16 of H100/H200 SXM; on the CPU: this machine's measured
fp32 matmul rate). Memory: CUDA ``max_memory_allocated`` per objective; CPU: the process's peak RSS so far
(monotone down the table, so only its growth is informative).

Usage::

    python benchmarks/bench_step.py [--preset cpu-tiny|flux-dev|flux2-klein-4b] [--refs 1 2] [--checkpointing off on]
                                    [--compile off on] [--warmup 2] [--iters 5] [--threads N]
    python benchmarks/bench_step.py --preset flux-dev --flops-only     # FLOP count at full size, any machine
    python benchmarks/bench_step.py --preset flux2-klein-4b --flops-only
    python benchmarks/bench_step.py --focus-cost                       # the focus maps and the tap, timed apart
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from focusdpo.backbones.base import TextCond, Tokens
from focusdpo.config import Config, LoraConfig, ModelConfig, TrainConfig
from focusdpo.train.step import NoiseKey, pair_step

OBJECTIVES = ("sft", "dpo", "focusdpo", "focusdpo-cosine")
LORA = LoraConfig(rank=16, alpha=16.0)
LORA_FLUX2 = LoraConfig(rank=16, alpha=16.0, targets=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                      "add_v_proj", "to_add_out", "to_qkv_mlp_proj"])
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}

FLUX2_KLEIN_4B = {"patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
                  "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
                  "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
                  "rope_theta": 2000, "guidance_embeds": False}  # black-forest-labs/FLUX.2-klein-4B transformer/


@dataclass
class Preset:
    size: int
    ref_size: int
    text_tokens: int
    dtype: torch.dtype
    device: str


PRESETS = {"cpu-tiny": Preset(64, 64, 32, torch.float32, "cpu"),
           "flux-dev": Preset(512, 512, 512, torch.bfloat16, "cuda"),
           "flux-dev-24gb": Preset(512, 512, 512, torch.bfloat16, "cuda"),
           "flux2-klein-4b": Preset(512, 512, 512, torch.bfloat16, "cuda")}


class RandomText:
    """Stand-in for T5-XXL + CLIP-L with their output shapes: fixed random features per prompt (flux-dev preset)."""

    def __init__(self, tokens: int, device: torch.device, dtype: torch.dtype, dim: int = 4096, pooled: int = 768):
        self.tokens, self.device, self.dtype, self._dim, self._pooled = tokens, device, dtype, dim, pooled

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def pooled_dim(self) -> int:
        return self._pooled

    def encode(self, prompts: Sequence[str]) -> TextCond:
        seed = int(hashlib.md5("|".join(prompts).encode()).hexdigest()[:8], 16)
        g = torch.Generator(self.device).manual_seed(seed)
        shape = (len(prompts), self.tokens, self._dim)
        return TextCond(torch.randn(shape, generator=g, device=self.device, dtype=self.dtype),
                        torch.randn(len(prompts), self._pooled, generator=g, device=self.device, dtype=self.dtype))


def build_backbone(preset: str, tmp: Path, latent_cache: bool, p: Preset, layers: Sequence[int] | None = None,
                   quantization: str = "none"):
    """The backbone of ``preset`` (sizes and device from ``p``) with LoRA (r16) attached, frozen base.

    ``layers``: ``(double, single)`` block counts replacing FLUX.1-dev's (19, 38), for a quick run of the
    flux-dev code path on a small machine.
    """

    if preset == "cpu-tiny":
        import sys

        from focusdpo.backbones import load_backbone

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny folder is a test fixture
        from flux_tiny import write_tiny_flux_folder

        folder = write_tiny_flux_folder(tmp / "flux-tiny", seed=0)
        cfg = ModelConfig.of(backbone="flux", checkpoint=str(folder), guidance=4.0, patch=16,
                          max_text_tokens=p.text_tokens, latent_cache=str(tmp / "latents") if latent_cache else None)
        bb = load_backbone(cfg, device=p.device)
    else:
        bb = _random_stack(preset, tmp, latent_cache, p, layers, quantization)
    bb.add_lora(LORA_FLUX2 if preset.startswith("flux2") else LORA)
    return bb


HEADS: list[int] = []  # --heads: attention heads instead of the architecture's (a narrow smoke run)


def _arch(preset: str, layers: Sequence[int] | None) -> dict:
    """The transformer config of ``preset`` with ``layers = (double, single)`` block counts when given."""
    arch = FLUX2_KLEIN_4B if preset.startswith("flux2") else FLUX_DEV
    arch = {**arch, **({"num_attention_heads": HEADS[0]} if HEADS else {})}
    return {**arch, **(dict(zip(("num_layers", "num_single_layers"), layers, strict=True)) if layers else {})}


def _quantized_transformer(arch: dict, quantization: str, device: torch.device, dtype: torch.dtype):
    """FLUX.1 transformer of ``arch`` at random weights, its blocks quantised one at a time on ``device``: the device
    never holds more than the quantised model plus one block in ``dtype``."""
    from diffusers import FluxTransformer2DModel
    from torch import nn

    from focusdpo.quantization import quantize_frozen

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**arch)
    finally:
        torch.set_default_dtype(default)
    transformer.requires_grad_(False)
    g = torch.Generator(device).manual_seed(0)

    def materialise(module: nn.Module) -> None:
        module.to_empty(device=device, recurse=False)
        for name, param in module.named_parameters(recurse=False):
            with torch.no_grad():
                if name == "bias":
                    param.zero_()
                elif param.ndim == 1:
                    param.fill_(1.0)  # norm scales
                else:
                    param.normal_(0.0, 0.02, generator=g)

    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    inside = {id(m) for b in blocks for m in b.modules()}
    for module in transformer.modules():
        if id(module) not in inside:
            materialise(module)
    for block in blocks:
        for module in block.modules():
            materialise(module)
        quantize_frozen(nn.ModuleList([block]), quantization)
    return transformer


def _random_stack(preset: str, tmp: Path, latent_cache: bool, p: Preset, layers: Sequence[int] | None,
                  quantization: str = "none"):
    """The full-size architecture of ``preset`` at random weights in ``p.dtype`` on ``p.device``, no LoRA;
    with ``quantization`` (flux-dev-24gb) the transformer blocks are quantised as they are built."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
    )

    from focusdpo.backbones.flux import FluxInContext
    from focusdpo.backbones.flux2 import Flux2InContext
    from focusdpo.backbones.flux2_vae import Flux2VAECodec
    from focusdpo.backbones.vae import FluxVAECodec, LatentCache

    flux2 = preset.startswith("flux2")
    device = torch.device(p.device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(p.dtype)  # build in bf16 directly: no fp32 detour of the full model
    try:
        with device:
            if quantization != "none":
                transformer = _quantized_transformer(_arch(preset, layers), quantization, device, p.dtype)
            else:
                transformer = (Flux2Transformer2DModel if flux2 else FluxTransformer2DModel)(**_arch(preset, layers))
            transformer.requires_grad_(False)
            vae = AutoencoderKLFlux2() if flux2 else AutoencoderKL(**FLUX_VAE)  # AutoencoderKLFlux2(): FLUX.2's VAE
    finally:
        torch.set_default_dtype(default)
    codec = (Flux2VAECodec if flux2 else FluxVAECodec)(vae, device=device)
    codec = LatentCache(codec, tmp / "latents") if latent_cache else codec
    if flux2:
        text = RandomText(p.text_tokens, device, p.dtype, dim=FLUX2_KLEIN_4B["joint_attention_dim"], pooled=0)
        return Flux2InContext(transformer, codec, text, FlowMatchEulerDiscreteScheduler())
    return FluxInContext(transformer, codec, RandomText(p.text_tokens, device, p.dtype), guidance=4.0)


def make_batch(size: int, ref_size: int, k: int, patch: int, b: int = 1, seed: int = 0) -> dict:
    """A DIP batch of ``b`` pairs with ``k`` subjects side by side; the negative differs only inside M_prior."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(b, 3, size, size, generator=g)
    regions = torch.zeros(b, k, size, size)
    for i in range(k):
        regions[:, i, size // 4: 3 * size // 4, i * size // k: (i + 1) * size // k] = 1
    m_prior = regions[:, 0].clone()
    neg = torch.where(m_prior[:, None] > 0, torch.rand(b, 3, size, size, generator=g), pos)
    h = size // patch
    return {"id": [f"pair{i}" for i in range(b)], "prompt": ["a red dog and a blue cat on the grass"] * b,
            "positive": pos, "negative": neg, "m_prior": m_prior, "regions": regions,
            "references": [torch.rand(b, 3, ref_size, ref_size, generator=g) for _ in range(k)],
            "ref_masks": [torch.ones(b, ref_size, ref_size) for _ in range(k)],
            "m_d": torch.rand(b, h, h, generator=g), "m_d_patch": patch}


class StepRunner:
    """One objective's training step on a fixed batch: ``pair_step`` -> backward -> AdamW on the LoRA.

    ``focusdpo-cosine`` is ``focusdpo`` with ``focus.readout=cosine`` on the middle double-stream block.
    """

    def __init__(self, bb, batch: dict, objective: str, autocast: torch.dtype | None, optimizer: str = "adamw"
                 ) -> None:
        self.bb, self.batch, self.autocast, self.objective = bb, batch, autocast, objective
        cfg = Config(lora=LORA, train=TrainConfig(objective=objective.removesuffix("-cosine")))
        if objective == "focusdpo-cosine":
            cfg = cfg.with_overrides(["focus.readout=cosine", "focus.tap_layer=null"])
        self.cfg = cfg
        params = [p for p in bb.transformer.parameters() if p.requires_grad]
        from focusdpo.train.optimizers import make_optimizer

        self.opt = make_optimizer(optimizer, params, 1e-6, 0.0)

    def __call__(self, i: int, optimize: bool = True) -> None:
        self.bb.tap_layer = self.cfg.focus.tap_layer
        with torch.autocast(self.bb.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = pair_step(self.bb.predict, self.bb, self.batch, NoiseKey(seed=0, step=i), self.cfg).loss
        loss.backward()
        if optimize:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure(runs: dict[str, StepRunner], warmup: int, iters: int) -> dict[str, tuple[float, float]]:
    """``{objective: (median step seconds, peak GiB)}``; objectives interleave step by step, so a drift of the
    machine's load hits all of them alike."""
    device = next(iter(runs.values())).bb.device
    for i in range(warmup):
        for run in runs.values():
            run(i)
    times: dict[str, list[float]] = {o: [] for o in runs}
    peaks = dict.fromkeys(runs, 0.0)
    for i in range(iters):
        for objective, run in runs.items():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            run(warmup + i)
            _sync(device)
            times[objective].append(time.perf_counter() - start)
            peaks[objective] = max(peaks[objective], _peak_gib(device))
    return {o: (statistics.median(times[o]), peaks[o]) for o in runs}


def model_flops(run: StepRunner) -> float:
    """FLOPs of one eager step without checkpointing (the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = run.bb.transformer
    checkpointing = transformer.gradient_checkpointing
    transformer.disable_gradient_checkpointing()
    try:
        with FlopCounterMode(display=False) as counter:
            run(0, optimize=False)
    finally:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
    return float(counter.get_total_flops())


def meta_pair_flops(k: int, p: Preset, layers: Sequence[int] | None = None, preset: str = "flux-dev"
                    ) -> tuple[float, float]:
    """``(reference forward, policy forward + backward)`` FLOPs of one DPO pair (positive + negative) through
    the transformer of ``preset`` (FLUX.1-dev or FLUX.2 [klein] 4B) with LoRA r16, counted on the meta device:
    no memory, no GPU, no weights."""
    from torch.utils.flop_counter import FlopCounterMode

    from focusdpo.lora import adapters_disabled, attach_lora

    flux2 = preset.startswith("flux2")
    with torch.device("meta"):
        if flux2:
            from diffusers import Flux2Transformer2DModel

            tr = Flux2Transformer2DModel(**_arch(preset, layers)).to(torch.bfloat16).requires_grad_(False)
        else:
            from diffusers import FluxTransformer2DModel

            tr = FluxTransformer2DModel(**_arch(preset, layers)).to(torch.bfloat16).requires_grad_(False)
    attach_lora(tr, LORA_FLUX2 if flux2 else LORA)
    g, r = p.size // 16, p.ref_size // 16
    inputs = _meta_inputs(flux2, g, r, k, p.text_tokens)

    def run(grad: bool) -> None:
        out = tr(**inputs, timestep=torch.rand(2, device="meta"), return_dict=False)[0]
        if grad:
            out[:, : g * g].float().square().mean().backward()

    with FlopCounterMode(display=False) as ref, torch.no_grad(), adapters_disabled(tr):
        run(False)
    with FlopCounterMode(display=False) as pol:
        run(True)
    return float(ref.get_total_flops()), float(pol.get_total_flops())


def field_flops(k: int, p: Preset, layers: Sequence[int] | None = None, pairs: int = 1,
                preset: str = "flux-dev") -> float:
    """FLOPs the attention field adds to one FocusDPO step with ``focus.tap_layer=all``: per block, one more
    attention of the ``N`` target queries of the ``2 * pairs`` tapped images against all ``L`` keys with value
    width ``head_dim`` (QK^T and PV: ``4 N L d`` per head); counted, not measured, as FlopCounterMode counts SDPA."""
    arch = _arch(preset, layers)
    n = (p.size // 16) ** 2
    length = p.text_tokens + n + k * (p.ref_size // 16) ** 2
    blocks = arch["num_layers"] + arch["num_single_layers"]
    width = arch["num_attention_heads"] * arch["attention_head_dim"]
    return 2 * pairs * blocks * 4 * n * length * width


def _meta_inputs(flux2: bool, g: int, r: int, k: int, text_tokens: int) -> dict:
    """Transformer inputs of a pair (batch 2): target ``g x g`` tokens, ``k`` references of ``r x r``."""
    meta = {"device": "meta", "dtype": torch.bfloat16}
    n = g * g + k * r * r
    if flux2:
        from focusdpo.backbones.flux2 import position_ids, text_ids

        return {"hidden_states": torch.randn(2, n, 128, **meta),
                "encoder_hidden_states": torch.randn(2, text_tokens, FLUX2_KLEIN_4B["joint_attention_dim"], **meta),
                "img_ids": position_ids((g, g), [(r, r)] * k, torch.device("meta")),
                "txt_ids": text_ids(text_tokens, torch.device("meta")), "guidance": None}
    from focusdpo.backbones.flux import position_ids

    return {"hidden_states": torch.randn(2, n, 64, **meta),
            "encoder_hidden_states": torch.randn(2, text_tokens, 4096, **meta),
            "pooled_projections": torch.randn(2, 768, **meta),
            "img_ids": position_ids((g, g), [(r, r)] * k, torch.device("meta")).float(),
            "txt_ids": torch.zeros(text_tokens, 3, device="meta"), "guidance": torch.full((2,), 4.0, device="meta")}


def print_meta_flops(args: argparse.Namespace, p: Preset) -> None:
    print("| K | reference fwd TFLOP | policy fwd+bwd TFLOP | DPO pair TFLOP | floor at 800 TFLOP/s "
          "| attention field (tap_layer=all) TFLOP | FocusDPO/DPO FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for k in args.refs:
        ref, pol = meta_pair_flops(k, p, args.layers, args.preset)
        extra = field_flops(k, p, args.layers, preset=args.preset)
        print(f"| {k} | {ref / 1e12:.1f} | {pol / 1e12:.1f} | {(ref + pol) / 1e12:.1f} | {(ref + pol) / 8e14:.3f} s "
              f"| {extra / 1e12:.2f} | {(ref + pol + extra) / (ref + pol):.3f} |")


def cpu_peak_flops(n: int = 1024, reps: int = 10) -> float:
    """This machine's fp32 matmul rate (FLOP/s), the CPU's MFU denominator."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def count_flops(bb, args: argparse.Namespace) -> dict[tuple[int, str], float]:
    """Model FLOPs per (K, objective), counted in eager mode before any compilation, after one step that warms
    the latent cache (so VAE encodes are not counted, as in the timed steps)."""
    p = args.sizes
    autocast = p.dtype if bb.device.type == "cuda" and p.dtype != torch.float32 else None
    flops = {}
    for k in args.refs:
        batch = make_batch(p.size, p.ref_size, k, bb.patch)
        for objective in OBJECTIVES:
            run = StepRunner(bb, batch, objective, autocast)
            run(0, optimize=False)
            flops[(k, objective)] = model_flops(run)
    return flops


def run_case(bb, k: int, checkpointing: bool, args: argparse.Namespace, flops: dict, peak: float) -> list[str]:
    """Markdown rows of the objectives for one case; ``flops``: the counts of :func:`count_flops`."""
    p = args.sizes
    batch = make_batch(p.size, p.ref_size, k, bb.patch)
    if checkpointing:
        bb.transformer.enable_gradient_checkpointing()
    else:
        bb.transformer.disable_gradient_checkpointing()
    autocast = p.dtype if bb.device.type == "cuda" and p.dtype != torch.float32 else None
    runs = {o: StepRunner(bb, batch, o, autocast, args.optimizer) for o in OBJECTIVES}
    results = measure(runs, args.warmup, args.iters)
    name = f"K={k}, ckpt {'on' if checkpointing else 'off'}, {'compiled' if args.compiled else 'eager'}"
    rows = []
    for objective in OBJECTIVES:
        t, mem = results[objective]
        ratio = ""
        if objective.startswith("focusdpo"):
            ratio = f"{t / results['dpo'][0]:.3f}"
        f = flops[(k, objective)]
        if math.isnan(f):
            rows.append(f"| {name}, {p.size} px | {objective} | {t:.3f} | {mem:.2f} | {ratio} |")
            continue
        rows.append(f"| {name} | {objective} | {t * 1e3:.1f} | {mem:.2f} | {ratio} | {f / 1e9:.3f} | "
                    f"{100 * f / t / peak:.1f}% |")
    return rows


def focus_cost(bb, args: argparse.Namespace) -> None:
    """Print what FocusDPO adds to a step, timed apart: the focus maps (``token_masks`` + ``compute_focus``) and a
    tapped vs an untapped no-grad forward of the ``[positive; negative]`` batch (median of ``--iters``)."""
    print("| K | focus maps ms | forward ms (no tap) | forward ms (tap) |")
    print("|---|---|---|---|")
    for k in args.refs:
        row = _focus_row(bb, k, args)
        print(f"| {k} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


def _focus_row(bb, k: int, args: argparse.Namespace) -> list[float]:
    from focusdpo.train.step import compute_focus, encode_batch, token_masks

    p = args.sizes
    batch = make_batch(p.size, p.ref_size, k, bb.patch)
    inputs = encode_batch(bb, batch)
    x = torch.cat([inputs.x0_w, inputs.x0_l])
    text = TextCond.cat([inputs.text, inputs.text])
    refs = [Tokens(torch.cat([r.tokens, r.tokens]), r.grid) for r in inputs.refs]
    grids = [r.grid for r in inputs.refs]
    t = torch.full((x.shape[0],), 0.5, device=bb.device)
    masks = token_masks(batch, bb.patch, grids, bb.device)
    bb.tap_layer = Config().focus.tap_layer
    with torch.no_grad():
        tap = bb.predict(x, t, text, refs, inputs.grid, tap=True, ref_masks=[torch.cat([m, m]) for m in masks[2]])[1]

    def focus() -> None:
        compute_focus(tap.select(slice(0, len(batch["id"]))), token_masks(batch, bb.patch, grids, bb.device),
                      Config().focus)

    def forward(tap: bool) -> None:
        with torch.no_grad():
            bb.predict(x, t, text, refs, inputs.grid, tap=tap)

    return [_median_ms(focus, args.iters, bb.device), _median_ms(lambda: forward(False), args.iters, bb.device),
            _median_ms(lambda: forward(True), args.iters, bb.device)]


def _median_ms(fn, iters: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--refs", type=int, nargs="+", default=[1, 2], help="Numbers of references K to time.")
    ap.add_argument("--checkpointing", choices=["off", "on"], nargs="+", default=["off", "on"])
    ap.add_argument("--compile", choices=["off", "on"], nargs="+", default=None,
                    help="Eager and/or diffusers compile_repeated_blocks (default: off on CPU, off on on CUDA).")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: see module doc).")
    ap.add_argument("--no-latent-cache", action="store_true", help="Encode images with the VAE in every step.")
    ap.add_argument("--device", default=None, help="Override the preset's device (e.g. cpu for a dry run).")
    ap.add_argument("--size", type=int, default=None, help="Override the target side in pixels (multiple of 16).")
    ap.add_argument("--ref-size", type=int, default=None, help="Override the reference side in pixels.")
    ap.add_argument("--text-tokens", type=int, default=None, help="Override the text tokens (flux-dev stand-in).")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="Override the preset's weight dtype (float32 for a dry run on a CPU).")
    ap.add_argument("--focus-cost", action="store_true",
                    help="Time the focus maps and the feature tap apart from the step, then exit.")
    ap.add_argument("--flops-only", action="store_true",
                    help="flux-dev, flux2-klein-4b: count the transformer FLOPs of one DPO pair on the meta device "
                         "and exit (no GPU).")
    ap.add_argument("--quantization", choices=["none", "int8", "fp8", "nf4"], default=None,
                    help="flux-dev-24gb: the frozen blocks' quantisation (default nf4 on CUDA, int8 on a CPU).")
    ap.add_argument("--optimizer", choices=["adamw", "adamw8bit", "adafactor"], default=None,
                    help="LoRA optimizer (default adamw; flux-dev-24gb: adamw8bit).")
    ap.add_argument("--sizes", dest="target_sizes", type=int, nargs="+", default=None,
                    help="flux-dev-24gb: target sides to run, references of the same side (default 512 1024).")
    ap.add_argument("--heads", type=int, default=None,
                    help="Attention heads instead of the architecture's 24 (width 128 each): a narrow smoke run.")
    ap.add_argument("--layers", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                    help="flux-dev, flux2-klein-4b: block counts instead of 19 38 / 5 20 (a quick run of the code "
                         "path).")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.heads:
        HEADS[:] = [args.heads]
    if args.threads:
        torch.set_num_threads(args.threads)
    base = PRESETS[args.preset]
    p = Preset(args.size or base.size, args.ref_size or base.ref_size, args.text_tokens or base.text_tokens,
               getattr(torch, args.dtype) if args.dtype else base.dtype, args.device or base.device)
    args.sizes = p
    if args.flops_only:
        print(f"# {args.preset} transformer FLOPs per DPO pair, {p.size} px target, {p.ref_size} px references, "
              f"{p.text_tokens} text tokens, LoRA r{LORA.rank} (meta device)")
        print_meta_flops(args, p)
        return
    if p.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--preset {args.preset} needs a CUDA GPU; use --preset cpu-tiny on a CPU")
    if args.preset == "flux-dev-24gb":
        main_24gb(args, p)
        return
    args.optimizer = args.optimizer or "adamw"
    cuda = p.device.startswith("cuda")
    compile_modes = args.compile or (["off", "on"] if cuda else ["off"])
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (989e12 if cuda else cpu_peak_flops())
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_step: preset {args.preset}, {device_name}, torch {torch.__version__}, LoRA r{LORA.rank}, "
          f"latent cache {'off' if args.no_latent_cache else 'on'}, warm-up {args.warmup}, median of {args.iters}, "
          f"MFU peak {peak / 1e12:.3f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        bb = build_backbone(args.preset, Path(tmp), not args.no_latent_cache, p, args.layers)
        if args.focus_cost:
            focus_cost(bb, args)
            return
        print("| case | objective | step ms | peak GiB | FocusDPO/DPO | GFLOP/step | MFU |")
        print("|---|---|---|---|---|---|---|")
        flops = count_flops(bb, args)
        for mode in compile_modes:  # eager first: compile_repeated_blocks compiles in place
            args.compiled = mode == "on"
            if args.compiled:
                bb.transformer.compile_repeated_blocks()
            for k, ckpt in itertools.product(args.refs, args.checkpointing):
                for row in run_case(bb, k, ckpt == "on", args, flops, peak):
                    print(row, flush=True)


def main_24gb(args: argparse.Namespace, base: Preset) -> None:
    """The flux-dev-24gb preset: quantised blocks, checkpointing, 8-bit AdamW; one table row per (size, K,
    objective) with seconds per pair, peak GiB and FocusDPO/DPO; the stack is rebuilt per size (the latent cache
    and peak are per size)."""
    cuda = base.device.startswith("cuda")
    args.quantization = args.quantization or ("nf4" if cuda else "int8")
    args.optimizer = args.optimizer or "adamw8bit"
    from focusdpo.quantization import check_quantization

    check_quantization(args.quantization, base.device)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_step: preset flux-dev-24gb, {device_name}, torch {torch.__version__}, base {args.quantization}, "
          f"optimizer {args.optimizer}, LoRA r{LORA.rank}, checkpointing on, warm-up {args.warmup}, median of "
          f"{args.iters}, layers {args.layers or (19, 38)}")
    print("| case | objective | s/pair | peak GiB | FocusDPO/DPO |")
    print("|---|---|---|---|---|")
    nan = {(k, o): math.nan for k in args.refs for o in OBJECTIVES}
    for size in args.target_sizes or [512, 1024]:
        p = Preset(size, size, base.text_tokens, base.dtype, base.device)
        args.sizes, args.compiled = p, False
        with tempfile.TemporaryDirectory() as tmp:
            bb = build_backbone("flux-dev-24gb", Path(tmp), not args.no_latent_cache, p, args.layers,
                                args.quantization)
            for k in args.refs:
                for row in run_case(bb, k, True, args, nan, 1.0):
                    print(row, flush=True)
            del bb
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
