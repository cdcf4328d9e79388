"""The FocusDPO post-training loop (DESIGN 2.2-2.6 and 7, issue 6): accelerate + peft LoRA, resumable.

``train(cfg, resume=False) -> run_dir`` wires the parts; each optimizer step is
:func:`focusdpo.train.step.pair_step` on ``train.grad_accum`` micro-batches, then clipping and AdamW.

Choices made here:

- The trainable module is ``backbone.trainable()`` inside a thin ``nn.Module`` whose ``forward`` is
  ``backbone.predict``; accelerate wraps that module (DDP/FSDP/DeepSpeed), so the policy forward goes through
  the wrapper while the frozen reference calls ``backbone.predict`` directly (adapters off, no grad).
- Data order: :mod:`focusdpo.train.batches` (global batches sliced per process, not round-robin sharding), so a step
  sees the same *global* batch (``data.batch_size * num_processes`` pairs) for any number of processes and the
  noise of a pair is keyed by ``(train.seed, step, micro-batch)`` (:class:`focusdpo.train.step.NoiseKey`).
  A 2-process run therefore reproduces a 1-process run with twice the batch size, and a resumed run the run
  it continues.
- The LR schedule is diffusers' ``get_scheduler`` (:mod:`focusdpo.train.schedule`, shared with pretraining),
  stepped by hand once per optimizer step (accelerate's prepared scheduler steps once per
  process, which would make the schedule depend on the process count).
- Gradient accumulation is done by hand (``no_sync`` on all but the last micro-batch).
- A non-finite loss, prediction or gradient norm raises :class:`TrainingError` naming the step and the
  metric before the optimizer moves; no checkpoint is written after it, so the last good one stays intact.
- SIGINT/SIGTERM: the current optimizer step finishes, a checkpoint is written, :class:`TrainingInterrupted`.
  At the last step the run is finished instead (final checkpoint, then ``lora.safetensors``; the final
  validation grids are skipped), so no interruption leaves a run that ``--resume`` cannot finish: a checkpoint
  at ``train.max_steps`` without its final LoRA (killed in between) is finished by ``--resume``, and
  ``--resume`` of a finished run says so and exits cleanly (issue 15 point 3).
- The run folder is locked while a trainer uses it, and a new run refuses a folder holding an earlier run
  unless ``overwrite`` (:mod:`focusdpo.train.run_folder`, issue 15 point 2).
- On-policy DIP (``data.refresh_every > 0``, issue 16): a round of :class:`~focusdpo.train.refresh.OnPolicy` runs
  before the optimizer steps it is due at, its pool replaces the tail of each later global batch, and its state
  goes into every checkpoint (:mod:`focusdpo.train.refresh`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from focusdpo.config import Config, ConfigError
from focusdpo.train import checkpoint as ckpt
from focusdpo.train.batches import Position, ShardedBatches
from focusdpo.train.precision import resolve_mixed_precision
from focusdpo.train.refresh import OnPolicy, build_judge, check_refresh
from focusdpo.train.run_folder import RunFolderError, RunFolderLock, check_fresh
from focusdpo.train.run_log import RunLog
from focusdpo.train.schedule import make_scheduler
from focusdpo.train.step import NoiseKey, NonFiniteError, StepOutput, pair_step
from focusdpo.train.trackers import check_installed
from focusdpo.train.user_validation import check_prompts, check_validation

# Config keys that may change when a run is resumed (they do not change what a step computes).
RESUMABLE_CHANGES = ("train.max_steps", "train.checkpoint_every", "train.log_every", "train.val_every",
                     "train.val_records", "train.keep_checkpoints", "data.num_workers", "train.output_dir",
                     "train.report_to", "train.tracker_project", "train.validation")


class TrainingError(RuntimeError):
    """Training stopped: a non-finite value or a run folder that does not fit; the message says what to do."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after writing a checkpoint; ``focusdpo train --resume`` continues it."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint written. Continue with: focusdpo train "
                         f"--resume train.output_dir={run_dir}")
        self.run_dir, self.step = run_dir, step


class PolicyModule(nn.Module):
    """``backbone.trainable()`` as a module whose forward is ``backbone.predict`` (what accelerate wraps)."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.net = backbone.trainable()
        self._backbone = [backbone]  # a list: not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._backbone[0].predict(*args, **kwargs)


@dataclass
class _Run:
    """Everything the loop touches."""

    cfg: Config
    accelerator: Any
    run_dir: Path
    backbone: Any
    module: Any
    optimizer: Any
    scheduler: Any
    data: ShardedBatches
    dataset: Any
    state: ckpt.TrainState
    log: RunLog
    params: list[nn.Parameter] = field(default_factory=list)
    last_saved: int = -1
    fingerprint: dict[str, Any] = field(default_factory=dict)
    peak: Any = None  # focusdpo.train.memory.PeakMemory: the peak of each step (metrics.csv peak_mem_mib)
    refresh: OnPolicy | None = None  # on-policy DIP (data.refresh_every > 0)


# --------------------------------------------------------------------------------------------- entry point


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Post-train the backbone's LoRA with ``cfg.train.objective``; returns the run folder.

    The run folder gets ``config.yaml``, ``metrics.csv``, ``tb/`` (TensorBoard; or W&B / MLflow, see
    ``train.report_to``), ``val/`` (sample grids and
    focus strips), ``validation/step-N.png`` (``train.validation``: the user's prompts),
    ``checkpoints/step-N/`` and, at the end, ``lora.safetensors`` and the model card ``README.md``
    (with the DIP set's card as ``dip.json``). ``resume=True`` continues
    from the newest checkpoint of ``train.output_dir`` exactly (same per-step losses). A new run refuses a
    folder holding an earlier run's files unless ``overwrite=True`` (which removes them first). The folder is
    locked for the whole call (:class:`~focusdpo.train.run_folder.RunFolderError` when another trainer holds it).
    """
    check_config(cfg, resume)
    accelerator = make_accelerator(cfg)
    run_dir = _run_dir(cfg, accelerator, resume)
    lock = _claim_run_dir(accelerator, run_dir, resume, overwrite)
    run = None
    try:
        if resume and _already_finished(cfg, run_dir):
            return run_dir
        run = _setup(cfg, accelerator, run_dir, resume)
        try:
            with _stop_on_signals() as stop:  # the final checkpoint and LoRA too: a signal never splits them
                _loop(run, stop)
                stopped = _finish(run, stop)
            if not stopped:  # outside the signal guard: Ctrl-C stops the final grids at once
                _validate(run)
                _user_validation(run)
                _write_card(run)
                run.log.message(f"done: {run.run_dir / 'lora.safetensors'}")
        finally:
            run.log.close()
    finally:
        lock.release(remove_if_empty=run is None)
    return run_dir


def check_config(cfg: Config, resume: bool) -> None:
    """Reject what cannot train before any work starts (:class:`ConfigError` naming the field and the fix)."""
    from focusdpo.backbones import backbone_spec

    expected = backbone_spec(cfg.model.backbone).prediction  # what the registry declares, before loading anything
    if cfg.loss.prediction != expected:
        raise ConfigError(f"loss.prediction={cfg.loss.prediction!r} is invalid for model.backbone="
                          f"{cfg.model.backbone!r}, whose diffusion convention predicts {expected}: allowed {expected}")
    if resume and cfg.train.output_dir is None:
        raise ConfigError("train.output_dir=None is invalid with --resume: allowed the folder of the run to resume")
    check_installed(cfg.train.report_to)
    check_validation(cfg)
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision='fp16' is invalid without a CUDA device: allowed auto, no, bf16")
    from focusdpo.quantization import check_quantization

    check_quantization(cfg.model.quantization, "cuda" if torch.cuda.is_available() else "cpu")
    from focusdpo.train.optimizers import check_optimizer

    check_optimizer(cfg.train.optimizer, "cuda" if torch.cuda.is_available() else "cpu")


def check_prediction(cfg: Config, backbone: Any) -> None:
    """``loss.prediction`` must be what the loaded backbone's diffusion convention regresses (a registered loader
    may return a backbone whose convention differs from what it declared)."""
    from focusdpo.backbones.diffusion import diffusion_of

    expected = diffusion_of(backbone).prediction
    if cfg.loss.prediction != expected:
        raise ConfigError(f"loss.prediction={cfg.loss.prediction!r} is invalid for model.backbone="
                          f"{cfg.model.backbone!r}, whose diffusion convention predicts {expected}: allowed {expected}")


def make_accelerator(cfg: Config) -> Any:
    """An ``accelerate.Accelerator`` for the run (process group, device, mixed precision)."""
    from accelerate import Accelerator

    precision = resolve_mixed_precision(cfg.train.mixed_precision)  # the config's, or the launcher's under auto
    mp = precision.value
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    use_cpu = not torch.cuda.is_available() or _env_flag("ACCELERATE_USE_CPU")
    _forget_single_process_state()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mp, gradient_accumulation_steps=1)
    accelerator.print(f"mixed precision {mp}: {precision.reason}")
    logging.getLogger(__name__).info("mixed precision %s: %s", mp, precision.reason)
    if use_cpu and accelerator.num_processes > 1 and _env_flag("ACCELERATE_USE_FSDP"):
        _fsdp_on_cpu_processes(accelerator)
    if use_cpu and accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # `accelerate launch --cpu --num_processes N` without an MPI hostfile starts ONE process (accelerate 1.x)
        warnings.warn("accelerate launch --cpu started a single process: several CPU processes need "
                      "`accelerate launch --multi_gpu --num_processes N` (gloo on a machine without CUDA; "
                      "ACCELERATE_USE_CPU=1 forces the CPU) or --mpirun_hostfile; see docs/distributed.md",
                      stacklevel=2)
    return accelerator


def _fsdp_on_cpu_processes(accelerator: Any) -> None:
    """Run an FSDP launch on CPU processes (gloo) as FSDP: accelerate keeps CPU processes as plain ``MULTI_CPU`` and
    drops the FSDP plugin of the launch config, so the plugin is put back here (the tests run FSDP2 this way;
    ``FOCUSDPO_FSDP_ON_CPU=0`` keeps accelerate's choice). See docs/distributed.md."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("FOCUSDPO_FSDP_ON_CPU", "1").strip() == "0":
        return
    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch's ACCELERATE_FSDP_* variables
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() copies it back


def _forget_single_process_state() -> None:
    """Let a second ``train()`` in the same single-process Python session use other settings (e.g. bf16):
    accelerate keeps its state process-wide and refuses changes. A distributed state is left alone."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _run_dir(cfg: Config, accelerator: Any, resume: bool) -> Path:
    from accelerate.utils import broadcast_object_list

    if cfg.train.output_dir is not None:
        run_dir = Path(cfg.train.output_dir).expanduser()
    else:
        stamp = [datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")]
        if accelerator.num_processes > 1:
            broadcast_object_list(stamp)  # every process names the same folder
        run_dir = Path("runs") / f"{cfg.train.objective}-{stamp[0]}"
    if resume and ckpt.latest_checkpoint(run_dir) is None:
        raise TrainingError(f"--resume: {ckpt.checkpoint_dir(run_dir)} holds no complete checkpoint: start the "
                            f"run without --resume")
    return run_dir


def _claim_run_dir(accelerator: Any, run_dir: Path, resume: bool, overwrite: bool) -> RunFolderLock:
    """Lock ``run_dir`` (main process) and, for a new run, check it holds no earlier run (``overwrite``: clear
    it). Every process raises the same :class:`RunFolderError` when the main process cannot."""
    from accelerate.utils import broadcast_object_list

    lock, error = RunFolderLock(run_dir), [None]
    if accelerator.is_main_process:
        try:
            lock.acquire()
            if not resume:
                check_fresh(run_dir, overwrite)
        except RunFolderError as e:
            lock.release(remove_if_empty=True)
            error = [str(e)]
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise RunFolderError(error[0])
    return lock


def _already_finished(cfg: Config, run_dir: Path) -> bool:
    """True (with a message) when the newest checkpoint is at or past ``train.max_steps`` and the run's
    ``lora.safetensors`` was written from it: ``--resume`` of a finished run has nothing to do."""
    import json

    from safetensors import safe_open

    path = ckpt.latest_checkpoint(run_dir)
    lora = run_dir / "lora.safetensors"
    try:
        step = int(json.loads((path / "state.json").read_text())["step"])
        with safe_open(str(lora), "pt") as f:
            lora_step = int((f.metadata() or {}).get("step", -1))
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return False  # unreadable: the normal resume path names what is wrong
    if step < cfg.train.max_steps or lora_step != step:
        return False
    print(f"{run_dir} is already finished at step {step} ({lora}): nothing to resume; raise train.max_steps "
          f"to train further", flush=True)
    return True


# ------------------------------------------------------------------------------------------------- set-up


def _data_path(cfg: Config, accelerator: Any) -> Path:
    """``data.path``, or the cached toy DIP set, built by the main process while the others wait."""
    from focusdpo.data import ensure_toy_dip

    with accelerator.main_process_first():
        return Path(ensure_toy_dip(cfg))


def _setup(cfg: Config, accelerator: Any, run_dir: Path, resume: bool) -> _Run:
    from accelerate.utils import set_seed

    from focusdpo.backbones import load_backbone
    from focusdpo.data.dataset import DipDataset, collate_dip
    from focusdpo.train.optimizers import make_optimizer
    from focusdpo.train.presets import effective_config

    _check_strategy(cfg, accelerator)
    eff = effective_config(cfg)  # train.memory applied; config.yaml keeps the fields as given
    check_refresh(cfg, accelerator)
    saved = _read_resume(cfg, accelerator, run_dir) if resume else None  # fail before any heavy work
    set_seed(cfg.train.seed)  # LoRA init and every global RNG; noise and data order have their own keys
    data_path = _data_path(cfg, accelerator)
    fingerprint = _check_dataset(data_path, saved)
    dataset = DipDataset(data_path)
    data = ShardedBatches(dataset, collate_dip, dataset.keys, cfg.data.batch_size, accelerator.process_index,
                          accelerator.num_processes, cfg.train.seed, cfg.data.num_workers,
                          pin_memory=accelerator.device.type == "cuda")
    backbone = load_backbone(eff.model, device=accelerator.device)
    check_prediction(cfg, backbone)
    try:
        backbone.tap_layer = cfg.focus.tap_layer
    except ValueError as err:  # the block names depend on the model, so only the backbone can check them
        raise ConfigError(str(err)) from None
    if cfg.train.validation:
        check_prompts(backbone, cfg)
    backbone.add_lora(cfg.lora)
    if saved is not None:  # before prepare: FSDP shards the weights it wraps
        backbone.load_lora_state_dict({k: v.to(backbone.device) for k, v in saved["lora"].items()})
    module = PolicyModule(backbone)
    params = _lora_params(module)
    if eff.train.gradient_checkpointing:
        _enable_gradient_checkpointing(module.net)
    if cfg.train.compile:
        _compile_regions(module.net, cfg.train.compile_backend)
    optimizer = make_optimizer(cfg.train.optimizer, params, cfg.train.lr, cfg.train.weight_decay)
    if cfg.model.quantization != "none":
        _ddp_skip_frozen(module)
    scheduler = make_scheduler(optimizer, cfg.train)
    module, optimizer = accelerator.prepare(module, optimizer)
    module.train()
    state = ckpt.TrainState(0, 0, 0, accelerator.num_processes)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ckpt.restore_rng(saved["rng"][accelerator.process_index])
        state = saved["state"]
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(run_dir)
        cfg.save(run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    log = RunLog(run_dir, state.step, cfg.train.max_steps, enabled=accelerator.is_main_process, cfg=cfg)
    refresh = None
    if cfg.data.refresh_every > 0:
        refresh = OnPolicy(cfg, dataset, backbone, build_judge(cfg, accelerator.device), run_dir,
                           accelerator.is_main_process)
        if saved is not None:
            refresh.load_state_files(saved.get("extra_files") or {}, state.step)
    run = _Run(cfg, accelerator, run_dir, backbone, module, optimizer, scheduler, data, dataset, state, log,
               params, last_saved=state.step if resume else -1, fingerprint=fingerprint, refresh=refresh)
    _report_memory(run)
    return run


def _report_memory(run: _Run) -> None:
    """``memory.json`` in the run folder: weight bytes by part (at start; the optimizer state again after the first
    step, when PyTorch optimizers have filled it) and what ``peak_mem_mib`` measures; a line in the log."""
    from focusdpo.train.memory import PeakMemory, weight_bytes, write_memory_report

    if run.peak is None:
        run.peak = PeakMemory(run.accelerator.device)
    parts = weight_bytes(run.backbone, run.optimizer)
    if run.accelerator.is_main_process:
        text = write_memory_report(run.run_dir, parts, run.peak.kind, run.state.step, run.cfg)
        run.log.message(text)


def _is_fsdp(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def _is_deepspeed(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def _check_strategy(cfg: Config, accelerator: Any) -> None:
    """DeepSpeed: refuse what it does not support before any work; give it the micro-batch size (our data
    loader is not passed to ``prepare``). A quantised base is refused under FSDP and DeepSpeed: they flatten and
    shard the frozen weights, which torchao/bitsandbytes tensors do not support through accelerate here."""
    if cfg.model.quantization != "none" and (_is_fsdp(accelerator) or _is_deepspeed(accelerator)):
        raise ConfigError(f"model.quantization={cfg.model.quantization!r} is invalid under "
                          f"{accelerator.distributed_type}: a quantised base is not sharded; allowed none, or train "
                          f"the quantised base with DDP / one process (docs/distributed.md)")
    if not _is_deepspeed(accelerator):
        return
    if cfg.train.grad_accum > 1:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} is invalid under DeepSpeed (its engine steps "
                          f"inside backward): allowed 1; raise data.batch_size or the number of processes")
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size


def _lora_params(module: PolicyModule) -> list[nn.Parameter]:
    """The trainable parameters, which must all be LoRA adapters (the base stays frozen)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    other = [n for n, _ in named if ".lora_A." not in n and ".lora_B." not in n]
    if other or not named:
        raise TrainingError(f"the backbone must train LoRA adapters only, found trainable {other[:3] or 'nothing'}: "
                            f"check lora.targets")
    return [p for _, p in named]


def _ddp_skip_frozen(module: nn.Module) -> None:
    """DDP broadcasts every parameter and buffer from rank 0 when it wraps a module, which torchao/bitsandbytes
    tensors do not support; the frozen base is loaded identically by every process, so DDP is told to leave it
    alone (only the LoRA adapters are synchronised and all-reduced). No effect without DDP."""
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)


def _enable_gradient_checkpointing(net: nn.Module) -> None:
    enable = getattr(net, "enable_gradient_checkpointing", None)
    if enable is None:
        raise ConfigError(f"train.gradient_checkpointing=True is invalid: {type(net).__name__} has no "
                          f"enable_gradient_checkpointing(); allowed false for this backbone")
    enable()


def _compile_regions(net: nn.Module, backend: str) -> None:
    """Regional compilation (DESIGN section 5): each repeated transformer block is compiled once and reused, so
    compile time stays small and the LoRA step runs at the compiled speed (tap hooks and adapters included)."""
    compile_blocks = getattr(net, "compile_repeated_blocks", None)
    if compile_blocks is None:
        raise ConfigError(f"train.compile=True is invalid: {type(net).__name__} has no compile_repeated_blocks(); "
                          f"allowed false for this backbone")
    compile_blocks(backend=backend)


# ------------------------------------------------------------------------------------------------- resume


def _read_resume(cfg: Config, accelerator: Any, run_dir: Path) -> dict[str, Any]:
    """The newest intact checkpoint of ``run_dir`` (this process's optimizer shard), checked against ``cfg``.

    Newer corrupt checkpoints are named in a warning and set aside (``.corrupt-step-N``) so the resumed run can
    write those steps again; none intact is a :class:`~focusdpo.train.checkpoint.CheckpointError` listing why
    each failed.
    """
    path, saved, skipped = ckpt.newest_intact(run_dir, accelerator.process_index)
    if path is None:
        reasons = "; ".join(reason for _, reason in skipped)
        raise ckpt.CheckpointError(f"--resume: no checkpoint of {run_dir} is intact ({reasons}): start a new run")
    for bad, reason in skipped:
        warnings.warn(f"{reason}; skipped it and resuming from {path} (the corrupt folder is kept as "
                      f"{bad.with_name(ckpt.CORRUPT_PREFIX + bad.name)})", stacklevel=2)
    accelerator.wait_for_everyone()  # every process has chosen before the main process renames
    if accelerator.is_main_process:
        for bad, _ in skipped:
            ckpt.set_aside(bad)
    _check_resumable(cfg, Config.from_yaml(saved["config_yaml"]), path)
    state: ckpt.TrainState = saved["state"]
    if state.step > cfg.train.max_steps:  # == max_steps: a final checkpoint without its LoRA, finished below
        raise TrainingError(f"{path} is at step {state.step} > train.max_steps={cfg.train.max_steps}: "
                            f"raise train.max_steps to train further")
    if state.world_size != accelerator.num_processes:
        raise TrainingError(f"{path} was written by {state.world_size} process(es), this run has "
                            f"{accelerator.num_processes}: resume with the same number of processes (the data "
                            f"order and the noise depend on the global batch)")
    return saved


def _check_dataset(data_path: Path, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The DIP set's fingerprint; on resume it must equal the checkpoint's (when the checkpoint recorded one)."""
    from focusdpo.data.parquet import fingerprint

    now = fingerprint(data_path)
    then = None if saved is None else saved.get("dataset")
    if then is not None and then != now:
        changed = "card.json" if then.get("card_sha256") != now["card_sha256"] else "shard sizes"
        raise TrainingError(f"the DIP set {data_path} changed since the checkpoint was written ({changed} differ: "
                            f"it was rebuilt or edited in place): resume with the set the run started on, or start "
                            f"a new run on this one")
    return now


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "disruptions":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_resumable(cfg: Config, saved: Config, path: Path) -> None:
    now, then = _flat(cfg.to_dict()), _flat(saved.to_dict())
    changed = sorted(k for k in now if now[k] != then.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        pairs = ", ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in changed[:6])
        raise TrainingError(f"the config differs from the one of {path} in {pairs}: resume with the saved "
                            f"config ({path / 'config.yaml'}); only {', '.join(RESUMABLE_CHANGES)} may change")
    if cfg.train.max_steps != saved.train.max_steps and cfg.train.schedule != "constant":
        raise TrainingError(f"train.max_steps changed ({saved.train.max_steps} -> {cfg.train.max_steps}) but "
                            f"train.schedule={cfg.train.schedule!r} depends on it: keep train.max_steps or "
                            f"start a new run")


# --------------------------------------------------------------------------------------------------- loop


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the returned event (the loop checkpoints and stops); a second SIGINT aborts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _any_process(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is true on any process (one tiny all-reduce when distributed)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _loop(run: _Run, stop: threading.Event) -> None:
    cfg = run.cfg
    batches = run.data.iterate(Position(run.state.epoch, run.state.batch_in_epoch))
    while run.state.step < cfg.train.max_steps:
        if run.refresh is not None and run.refresh.due(run.state.step):
            row = run.refresh.run_round(run.state.step, run.accelerator.autocast)
            run.log.message(f"on-policy round {row['round']}: kept {row['kept']} of {row['candidates']} "
                            f"({row['time_s']:.1f} s)")
        metrics = _optimizer_step(run, batches)
        run.state.step += 1
        step = run.state.step
        run.log.log(step, metrics, scalars=step % cfg.train.log_every == 0)
        if step == 1:
            _report_memory(run)  # the optimizer state exists now
        stop_now = _any_process(run.accelerator, stop.is_set())
        if stop_now or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            _save(run)
        if stop_now and step < cfg.train.max_steps:  # at the last step: finish (quick) rather than stop
            raise TrainingInterrupted(run.run_dir, step)
        if cfg.train.val_every and step % cfg.train.val_every == 0 and step < cfg.train.max_steps:
            _validate(run)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
            _user_validation(run)


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _optimizer_step(run: _Run, batches: Iterator[tuple[Position, Any]]) -> dict[str, float]:
    """``train.grad_accum`` micro-batches, clipping, AdamW and the LR schedule; returns the step's metrics."""
    acc, cfg, step = run.accelerator, run.cfg, run.state.step + 1
    times = {"time_data": 0.0, "time_forward": 0.0, "time_backward": 0.0}
    outs: list[StepOutput] = []
    for micro in range(cfg.train.grad_accum):
        t0 = time.perf_counter()
        position, batch = next(batches)
        if run.refresh is not None:
            batch = run.refresh.mix(batch, step, micro, acc.process_index, acc.num_processes)
        t1 = _sync_time(acc.device)
        last = micro == cfg.train.grad_accum - 1
        with nullcontext() if last else acc.no_sync(run.module):
            out = _forward(run, batch, NoiseKey(cfg.train.seed, step, micro, acc.process_index, acc.num_processes),
                           step)
            t2 = _sync_time(acc.device)
            acc.backward(out.loss / cfg.train.grad_accum)
            t3 = _sync_time(acc.device)
        times["time_data"] += t1 - t0
        times["time_forward"] += t2 - t1
        times["time_backward"] += t3 - t2
        outs.append(out)
    t4 = time.perf_counter()
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    # FSDP computes the norm over its shards only when given exactly the wrapped module's parameters
    norm = acc.clip_grad_norm_(run.module.parameters() if _is_fsdp(acc) else run.params, max_norm)
    grad_norm = math.nan if norm is None else float(norm)  # None: DeepSpeed without a norm (clips in its engine)
    if norm is not None and not math.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(_non_finite_message(run, step, "gradient norm", grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.epoch, run.state.batch_in_epoch = position.epoch, position.batch
    times["time_optim"] = _sync_time(acc.device) - t4
    return {**_reduce_metrics(acc, outs), "lr": lr, "grad_norm": grad_norm, **times,
            "peak_mem_mib": run.peak.read() if run.peak is not None else math.nan}


def _forward(run: _Run, batch: Any, noise: NoiseKey, step: int) -> StepOutput:
    """One micro-batch's :func:`pair_step`; a non-finite value on any process stops every process."""
    bad, out = None, None
    try:
        with run.accelerator.autocast():
            out = pair_step(run.module, run.backbone, batch, noise, run.cfg)
    except NonFiniteError as e:
        bad = e.metric
    if _any_process(run.accelerator, bad is not None):
        raise TrainingError(_non_finite_message(run, step, bad or "value on another process", math.nan))
    return out


def _non_finite_message(run: _Run, step: int, metric: str, value: float) -> str:
    last = ckpt.latest_checkpoint(run.run_dir)
    kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
    return (f"step {step}: non-finite {metric} ({value}); the step was not applied and {kept}. Lower train.lr "
            f"or loss.beta, or set train.max_grad_norm > 0, then resume")


def _reduce_metrics(acc: Any, outs: list[StepOutput]) -> dict[str, float]:
    """Per-pair metrics of all micro-batches and processes -> their mean over the global batch (NaN-aware)."""
    keys = sorted(outs[0].metrics)
    local = torch.stack([torch.cat([o.metrics[k].float().reshape(-1) for o in outs]) for k in keys])
    if acc.num_processes > 1:
        local = acc.gather(local[None].contiguous()).permute(1, 0, 2).reshape(len(keys), -1)
    means = torch.nanmean(local.cpu(), dim=1)
    return {k: float(v) for k, v in zip(keys, means, strict=True)}


# ------------------------------------------------------------------------------------ checkpoints and end


def _save(run: _Run) -> None:
    """Checkpoint the current step (a collective: every process calls it; the main process writes)."""
    from accelerate.utils import gather_object

    acc = run.accelerator
    rng = [ckpt.capture_rng()]
    if acc.num_processes > 1:
        rng = gather_object(rng)
    lora = _lora_state(run)
    sharded = _is_fsdp(acc) or _is_deepspeed(acc)
    if sharded:  # every process writes its optimizer shard into the temp folder the main process made
        if acc.is_main_process:
            ckpt.begin_checkpoint(run.run_dir, run.state.step)
        acc.wait_for_everyone()
        ckpt.write_optimizer_shard(ckpt.temp_dir(run.run_dir, run.state.step), acc.process_index,
                                   run.optimizer.state_dict())
        acc.wait_for_everyone()
    if acc.is_main_process:
        path = ckpt.save_checkpoint(run.run_dir, run.state, lora, None if sharded else run.optimizer.state_dict(),
                                    run.scheduler.state_dict(), rng, run.cfg.to_yaml(), started=sharded,
                                    dataset=run.fingerprint,
                                    extra_files=run.refresh.state_files() if run.refresh is not None else None)
        ckpt.prune(run.run_dir, run.cfg.train.keep_checkpoints)
        run.log.message(f"checkpoint {path}")
    run.last_saved = run.state.step
    acc.wait_for_everyone()


def _lora_state(run: _Run) -> dict[str, torch.Tensor]:
    """The full adapter weights (under FSDP gathered from the shards: a collective, complete on the main process)."""
    if not _is_fsdp(run.accelerator):
        return run.backbone.lora_state_dict()
    from focusdpo.lora import ADAPTER

    full = run.accelerator.get_state_dict(run.module)
    return {k.removeprefix("net.").replace(f".{ADAPTER}.", "."): v for k, v in full.items()
            if ".lora_A." in k or ".lora_B." in k}


def _finish(run: _Run, stop: threading.Event) -> bool:
    """Last checkpoint, then the final LoRA (``lora.safetensors``): killed in between, ``--resume`` writes it.
    Returns whether a signal asked to stop (the caller then skips the final validation grids)."""
    from focusdpo.lora import save_lora

    if run.last_saved != run.state.step:
        _save(run)
    lora = _lora_state(run)
    if run.accelerator.is_main_process:
        cfg = run.cfg
        meta = {"format": "focusdpo-lora", "objective": cfg.train.objective, "step": str(run.state.step),
                "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha), "targets": ",".join(cfg.lora.targets),
                "base": str(cfg.model.checkpoint), "backbone": cfg.model.backbone}
        save_lora(run.run_dir / "lora.safetensors", lora, metadata=meta)
    stopped = _any_process(run.accelerator, stop.is_set())
    if stopped:
        run.log.message(f"interrupted at the last step: the run is finished ({run.run_dir / 'lora.safetensors'}); "
                        f"final validation grids skipped")
    return stopped


def _write_card(run: _Run) -> None:
    """The run's model card (``README.md``) with the DIP set's card kept beside it as ``dip.json`` (main process)."""
    import shutil

    from focusdpo.train.model_card import DATA_CARD_NAME, write_model_card

    if run.accelerator.is_main_process:
        data_card = run.dataset.shards[0].parent / "card.json"
        if data_card.is_file():
            shutil.copyfile(data_card, run.run_dir / DATA_CARD_NAME)
        write_model_card(run.run_dir)
    run.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ validation


def validation_batch(dataset: Any, n: int) -> dict[str, Any]:
    """The first ``n`` records sharing record 0's (subjects, sizes) key, collated (a fixed validation set)."""
    from focusdpo.data.dataset import collate_dip

    key = dataset.keys[0]
    idx = [i for i, k in enumerate(dataset.keys) if k == key][:n]
    return collate_dip([dataset[i] for i in idx])


def _validate(run: _Run) -> None:
    """Sample grids (references | positive | base | post-trained) and a focus strip into ``val/`` and TensorBoard.

    Not under FSDP: its sharded weights need every process in each forward; sample the final LoRA instead.
    """
    if _is_fsdp(run.accelerator):
        run.log.message("validation grids are not drawn under FSDP (sharded weights): run `focusdpo eval` or "
                        "`focusdpo focus-map` on the finished run")
    elif run.accelerator.is_main_process:
        _write_validation(run)
    run.accelerator.wait_for_everyone()


def _user_validation(run: _Run) -> None:
    """``train.validation``: the user's prompts and references sampled into ``validation/step-N.png`` and the
    tracker (:mod:`focusdpo.train.user_validation`), at the training records' sizes. Not under FSDP."""
    cfg, step = run.cfg, run.state.step
    if not cfg.train.validation:
        return
    if _is_fsdp(run.accelerator):
        run.log.message("train.validation prompts are not sampled under FSDP (sharded weights): run `focusdpo "
                        "sample --prompt ... --ref ...` on the finished run")
    elif run.accelerator.is_main_process:
        from focusdpo.train.user_validation import load_references, write_validation

        item = run.dataset[0]
        refs = load_references(cfg, tuple(item["references"][0].shape[-2:]))
        grid = write_validation(run.backbone, cfg, refs, tuple(item["positive"].shape[-2:]),
                                run.run_dir / "validation" / f"step-{step:08d}.png", run.accelerator.autocast)
        run.log.image("validation/samples", grid, step)
    run.accelerator.wait_for_everyone()


def _write_validation(run: _Run) -> None:
    from PIL import Image

    from focusdpo.sampling import generate, sample_grid
    from focusdpo.train.focus_strip import focus_strip

    cfg, backbone, step = run.cfg, run.backbone, run.state.step
    batch = validation_batch(run.dataset, cfg.train.val_records)
    out_dir = run.run_dir / "val"
    out_dir.mkdir(parents=True, exist_ok=True)
    net = backbone.trainable()
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), run.accelerator.autocast():
            size = (batch["positive"].shape[-2], batch["positive"].shape[-1])
            post = generate(backbone, batch["prompt"], batch["references"], size, cfg.sample)
            with backbone.reference():
                base = generate(backbone, batch["prompt"], batch["references"], size, cfg.sample)
            grid = sample_grid(batch["references"], [batch["positive"], base.float().cpu(), post.float().cpu()])
            strip = focus_strip(backbone, batch, cfg, out_dir / f"focus-step-{step:08d}.png")
    finally:
        net.train(was_training)
    Image.fromarray(grid).save(out_dir / f"samples-step-{step:08d}.png")
    run.log.image("val/samples", grid, step)
    run.log.image("val/focus", strip, step)
