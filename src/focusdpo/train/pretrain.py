"""Pretraining the built-in tiny base on the synthetic world: flow matching on ground-truth scenes.

Each step draws a fresh batch of training-identity scenes (one subject count K per batch) from an RNG seeded by
``(train.seed, step)``, so the data stream needs no state and a resumed run sees exactly the batches an
uninterrupted one would. The loss is the FLUX flow-matching regression ``|v_theta(x_t, s) - (eps - x_0)|^2`` with
``s`` logit-normal and resolution-shifted (``loss.logit_mean/std``, ``loss.time_shift``); the prompt is dropped
(replaced by the empty prompt) with probability ``text_dropout`` so the sampler can use classifier-free guidance.
The whole model (transformer and text encoder) trains; an exponential moving average of the weights is what
``model.safetensors`` holds.

Settings reused from the config: ``world.*``, ``model.*`` (architecture), ``data.batch_size``, ``train.max_steps,
lr, weight_decay, warmup_steps, schedule, max_grad_norm, seed, checkpoint_every, log_every, output_dir``,
``loss.logit_mean, logit_std, time_shift``. The learning rate follows the trainer's schedule
(:func:`focusdpo.train.schedule.make_scheduler`, diffusers' ``get_scheduler``); its state is saved in ``state/``.
The output folder holds ``model.safetensors`` (EMA weights, the file
``model.checkpoint`` takes), ``config.yaml``, ``pretrain.log`` and ``state/`` (raw weights, EMA, optimizer,
LR schedule, step).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from focusdpo.backbones.flux import FluxInContext, build_tiny, save_tiny
from focusdpo.config import Config, LossConfig
from focusdpo.sampling import shift_mu, time_shift
from focusdpo.train.schedule import make_scheduler


@dataclass
class PretrainOptions:
    """Pretraining knobs that are not part of the run config (the CLI exposes them as options)."""

    subject_counts: tuple[int, ...] = (1, 2, 3)   # K drawn uniformly per batch
    text_dropout: float = 0.1                    # probability of the empty prompt (for guidance)
    ema_decay: float = 0.999                     # EMA of the weights written to model.safetensors
    stop_at: int | None = None                   # stop (and checkpoint) after this step; the schedule still
                                                 # runs to train.max_steps, so a later call continues it
    init: str | None = None                      # warm start: a flux-tiny checkpoint (file, run folder or
                                                 # "shipped") whose weights start a new run (step 0, new
                                                 # schedule); ignored when output_dir/state exists (resume)

    def __post_init__(self) -> None:
        if not self.subject_counts or any(k not in (1, 2, 3) for k in self.subject_counts):
            raise ValueError(f"subject_counts={self.subject_counts} is invalid: allowed a non-empty list of 1, 2, 3")
        if not 0 <= self.text_dropout < 1:
            raise ValueError(f"text_dropout={self.text_dropout} is invalid: allowed [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} is invalid: allowed [0, 1)")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at={self.stop_at} is invalid: allowed >= 1 or None")


def to_float_images(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``uint8 [H, W, 3]`` images -> ``float [B, 3, H, W]`` in ``[0, 1]``."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def scene_batch(world: object, rng: np.random.Generator, batch_size: int, k: int, split: str = "train"
                ) -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
    """``batch_size`` scenes of ``k`` subjects: prompts, images ``[B, 3, S, S]``, K references ``[B, 3, R, R]``."""
    scenes = [world.sample_scene(rng, split=split, n_subjects=k) for _ in range(batch_size)]
    images = to_float_images([s.image for s in scenes])
    refs = [to_float_images([s.references[j] for s in scenes]) for j in range(k)]
    return [s.prompt for s in scenes], images, refs


def sample_sigmas(n: int, n_tokens: int, cfg: LossConfig, generator: torch.Generator) -> torch.Tensor:
    """``float [n]`` in ``(0, 1)``: sigmoid of N(logit_mean, logit_std), FLUX-shifted when ``cfg.time_shift``."""
    s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    return time_shift(s, shift_mu(n_tokens)) if cfg.time_shift else s


def flow_loss(backbone: FluxInContext, prompts: list[str], images: torch.Tensor, refs: list[torch.Tensor],
              cfg: LossConfig, generator: torch.Generator) -> torch.Tensor:
    """Mean flow-matching error ``|v_theta - (eps - x_0)|^2`` over a batch (scalar)."""
    x0 = backbone.encode_images(images)
    ref_tokens = [backbone.encode_images(r) for r in refs]
    eps = torch.randn(x0.tokens.shape, generator=generator).to(x0.tokens.device)
    s = sample_sigmas(len(prompts), x0.tokens.shape[1], cfg, generator).to(x0.tokens.device)
    x_t, target = backbone.diffusion.noisy(x0.tokens, eps, s)
    pred, _ = backbone.predict(x_t, s, backbone.encode_prompts(prompts), ref_tokens, x0.grid)
    return ((pred.float() - target) ** 2).mean()


def _modules(backbone: FluxInContext) -> nn.ModuleDict:
    return nn.ModuleDict({"transformer": backbone.transformer, "text_encoder": backbone.text_encoder})


class _Ema:
    """Exponential moving average of a module's float tensors, with the usual ``(1 + n) / (10 + n)`` warm-up."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1 - d)
            else:
                self.shadow[k].copy_(v)


def _save_state(out: Path, modules: nn.ModuleDict, ema: _Ema, optim: torch.optim.Optimizer,
                scheduler: LambdaLR, step: int) -> None:
    """Write ``state/`` atomically: a complete temp folder renamed over the previous one."""
    tmp, final, old = out / "state.tmp", out / "state", out / "state.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in modules.state_dict().items()}, str(tmp / "raw.safetensors"))
    save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    torch.save(optim.state_dict(), tmp / "optim.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(out: Path, modules: nn.ModuleDict, ema: _Ema, optim: torch.optim.Optimizer,
                scheduler: LambdaLR) -> int:
    """Restore weights, EMA, optimizer and LR schedule from ``state/``; returns the number of steps already done.

    A ``state/`` written before the schedule was saved has no ``scheduler.pt``: the schedule is a function of the
    step count alone, so stepping a fresh one ``step`` times restores it.
    """
    state = out / "state"
    modules.load_state_dict(load_file(str(state / "raw.safetensors")), strict=True)
    ema.shadow = load_file(str(state / "ema.safetensors"))
    optim.load_state_dict(torch.load(state / "optim.pt", weights_only=True))
    step = int(json.loads((state / "step.json").read_text())["step"])
    if (state / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(state / "scheduler.pt", weights_only=True))
    else:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                scheduler.step()
    return step


def _load_init(init: str, backbone: FluxInContext, cfg: Config) -> None:
    """Copy the weights of the tiny checkpoint ``init`` (a file, a run folder, or ``shipped``) into ``backbone``.

    The checkpoint must have this config's architecture and this world's vocabulary (same words, same order).
    """
    from focusdpo.backbones import tiny_checkpoint_file
    from focusdpo.backbones.flux import load_tiny, read_tiny_metadata

    try:
        path = tiny_checkpoint_file(None if init == "shipped" else init)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"pretrain init={init}: {e}") from None
    _, vocabulary = read_tiny_metadata(path)
    if vocabulary != backbone.text_encoder.vocabulary:
        raise ValueError(f"pretrain init={init}: its vocabulary differs from this world's; use a matching checkpoint")
    source = load_tiny(path, cfg.model)
    _modules(backbone).load_state_dict(_modules(source).state_dict())


def _write_model(out: Path, backbone: FluxInContext, ema: _Ema, cfg: Config) -> None:
    """``model.safetensors`` = the EMA weights in the tiny checkpoint format."""
    current = {k: v.clone() for k, v in _modules(backbone).state_dict().items()}
    _modules(backbone).load_state_dict(ema.shadow)
    save_tiny(backbone, out / "model.safetensors", cfg.model)
    _modules(backbone).load_state_dict(current)


def _train_step(backbone: FluxInContext, world: object, cfg: Config, opts: PretrainOptions,
                optim: torch.optim.Optimizer, scheduler: LambdaLR, step: int) -> float:
    """One optimizer step on the batch of ``step`` (deterministic from ``(train.seed, step)``); returns the loss."""
    rng = np.random.default_rng([cfg.train.seed, step])
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    k = int(rng.choice(opts.subject_counts))
    prompts, images, refs = scene_batch(world, rng, cfg.data.batch_size, k)
    prompts = ["" if rng.random() < opts.text_dropout else p for p in prompts]
    loss = flow_loss(backbone, prompts, images.to(backbone.device), [r.to(backbone.device) for r in refs],
                     cfg.loss, gen)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretrain step {step}: non-finite loss {loss.item()}; lower train.lr")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(_modules(backbone).parameters(), cfg.train.max_grad_norm)
    optim.step()
    scheduler.step()
    return float(loss.item())


def pretrain(cfg: Config, output_dir: str | Path, opts: PretrainOptions | None = None,
             device: torch.device | str | None = None, resume: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Train the tiny base for ``cfg.train.max_steps`` steps; resumes from ``output_dir/state`` when present.

    Returns the path of ``model.safetensors`` (the EMA weights).
    """
    from focusdpo.world import World

    opts = opts or PretrainOptions()
    if cfg.model.backbone != "flux-tiny":
        raise ValueError(f"model.backbone={cfg.model.backbone!r}: pretrain builds the flux-tiny base only")
    if cfg.model.quantization != "none":
        raise ValueError(f"model.quantization={cfg.model.quantization!r} is invalid for pretrain, which trains every "
                         f"base weight: allowed none (quantise the base when post-training it)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = World(cfg.world)
    torch.manual_seed(cfg.train.seed)
    backbone = build_tiny(cfg.model, world.vocabulary(), device)
    modules = _modules(backbone)
    modules.train()
    optim = torch.optim.AdamW(modules.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(optim, cfg.train)
    ema = _Ema(modules, opts.ema_decay)
    resuming = resume and (out / "state").exists()
    if opts.init is not None and not resuming:
        _load_init(opts.init, backbone, cfg)
        ema = _Ema(modules, opts.ema_decay)
    start = _load_state(out, modules, ema, optim, scheduler) if resuming else 0
    cfg.save(out / "config.yaml")
    n_params = sum(p.numel() for p in modules.parameters())
    end = min(cfg.train.max_steps, opts.stop_at or cfg.train.max_steps)
    _log(out, log, f"pretrain: {n_params} parameters, steps {start}..{end} of {cfg.train.max_steps}, batch "
                   f"{cfg.data.batch_size}, threads {torch.get_num_threads()}")
    t0, window = time.time(), []
    for step in range(start, end):
        lr = scheduler.get_last_lr()[0]
        window.append(_train_step(backbone, world, cfg, opts, optim, scheduler, step))
        ema.update(modules, step)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == end:
            rate = (time.time() - t0) / (done - start)
            _log(out, log, f"step {done} loss {np.mean(window):.4f} lr {lr:.2e} "
                           f"{rate:.2f} s/step elapsed {time.time() - t0:.0f} s")
            window = []
        if done == end or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
            _save_state(out, modules, ema, optim, scheduler, done)
            _write_model(out, backbone, ema, cfg)
    if start >= end and not (out / "model.safetensors").exists():
        _write_model(out, backbone, ema, cfg)
    return out / "model.safetensors"


def _log(out: Path, log: Callable[[str], None], line: str) -> None:
    stamped = f"{time.strftime('%H:%M:%S')} {line}"
    with open(out / "pretrain.log", "a") as f:
        f.write(stamped + "\n")
    log(stamped)
