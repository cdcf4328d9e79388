"""The ``focusdpo`` command line (typer).

Commands import their implementation lazily so that ``focusdpo --help`` stays fast. Every command that
reads a config takes ``--config FILE`` or the ``--config NAME`` of a packaged config (default: ``toy``;
``focusdpo config --list``) and trailing ``key.sub=value`` overrides. Expected failures go through one error
path (:mod:`focusdpo.cli_errors`): one message naming the file or field and the fix, exit code 2, no traceback;
``focusdpo --debug <command>`` shows the traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

app = typer.Typer(
    name="focusdpo",
    help="FocusDPO: preference post-training for multi-subject personalized image generators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file, or the name of a packaged config (toy, "
                                                       "flux-uno, ...: `focusdpo config --list`). Default: toy.")
OverridesArg = typer.Argument(None, help="Config overrides, key.sub=value.", show_default=False)


_DEBUG = {"on": False}


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error."),
          plugin: list[str] | None = typer.Option(
              None, "--plugin", help="Import MODULE first: a plug-in that registers objectives or backbones "
                                     "(repeatable; also FOCUSDPO_PLUGINS and the focusdpo.plugins entry points).")
          ) -> None:
    """FocusDPO: preference post-training for multi-subject personalized image generators."""
    from focusdpo.cli_errors import guard

    _DEBUG["on"] = debug
    guard(ctx.command, debug)
    if plugin:
        from focusdpo.plugins import PluginError, add_plugins

        try:
            add_plugins(list(plugin))
        except PluginError as e:
            if debug:
                raise
            typer.secho(f"--plugin: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from e


def _load(config: Path | None, overrides: list[str] | None):
    from focusdpo.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        if _DEBUG["on"]:
            raise
        typer.secho(f"config error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e


@app.command("config")
def config_cmd(config: Path | None = ConfigOpt, overrides: list[str] | None = OverridesArg,
               list_: bool = typer.Option(False, "--list", help="List the packaged configs (--config NAME)."),
               ) -> None:
    """Print the resolved config (YAML) after overrides, then each train.memory preset's settings (YAML comments);
    or list the packaged configs."""
    if list_:
        from focusdpo.config import packaged_config_names, packaged_config_summary

        for name in packaged_config_names():
            typer.echo(f"{name:<14} {packaged_config_summary(name)}")
        return
    from focusdpo.train.presets import describe_presets

    cfg = _load(config, overrides)
    typer.echo(cfg.to_yaml() + describe_presets(cfg), nl=False)


@app.command("registry")
def registry_cmd() -> None:
    """List the registered backbones (with their config section) and objectives, plug-ins included."""
    import dataclasses

    from focusdpo.backbones import backbone_names, backbone_spec
    from focusdpo.objectives import get_objective, objective_names

    typer.echo("backbones (model.backbone; its section model.<name>):")
    for name in backbone_names():
        spec = backbone_spec(name)
        fields = ", ".join(f.name for f in dataclasses.fields(spec.options)) or "(no fields)"
        typer.echo(f"  {name:<10} {spec.summary or spec.loader.__module__}; predicts {spec.prediction}; "
                   f"model.{name}: {fields}")
    typer.echo("objectives (train.objective):")
    for name in objective_names():
        o = get_objective(name)
        needs = [w for w, on in (("reference", o.needs_reference), ("negative", o.needs_negative),
                                 ("focus", o.uses_focus)) if on]
        typer.echo(f"  {name:<10} {o.summary}" + (f" (uses {', '.join(needs)})" if needs else ""))


@app.command("world")
def world_cmd(
    out: Path | None = typer.Option(None, "--out", "-o", help="Write a preview PNG (scene | references per row)."),
    n: int = typer.Option(8, "--n", help="Scenes in the preview."),
    split: str = typer.Option("train", "--split", help="Identities of the preview: train or heldout."),
    seed: int = typer.Option(0, "--seed", help="Seed of the preview scenes."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """The built-in world: attribute counts, identities, split sizes; optionally a preview sheet."""
    import json

    import numpy as np
    from PIL import Image

    from focusdpo.world import World
    from focusdpo.world.summary import describe, preview_sheet

    world = World(_load(config, overrides).world)
    typer.echo(json.dumps(describe(world), indent=2))
    if out is not None:
        try:
            sheet, prompts = preview_sheet(world, np.random.default_rng(seed), n, split)
        except ValueError as e:
            typer.secho(f"world: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from e
        Image.fromarray(sheet).save(out)
        typer.echo("\n".join(f"{i}: {p}" for i, p in enumerate(prompts)))
        typer.echo(f"wrote {out}")


dip_app = typer.Typer(help="DIP datasets: build (toy world or JSONL manifest), show and push.", no_args_is_help=True)
app.add_typer(dip_app, name="dip")


@dip_app.command("build")
def dip_build_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (Parquet shards, card.json, rejected.jsonl)."),
    world: str | None = typer.Option(None, "--world", help="Build from the built-in world: 'toy'."),
    manifest: Path | None = typer.Option(None, "--manifest", help="Build from a JSONL manifest of file paths."),
    n: int | None = typer.Option(None, "--n", help="Toy: number of records (default data.n_records)."),
    seed: int | None = typer.Option(None, "--seed", help="Build seed (default data.seed)."),
    patch: int | None = typer.Option(None, "--patch", help="Pixels per token side of M_d (default model.patch)."),
    auto_masks: bool = typer.Option(False, "--auto-masks", help="Manifest: make the masks a record does not give, "
                                    "for K subjects: detector + segmenter (data.mask_detector, data.mask_segmenter) "
                                    "or GrabCut (data.mask_backend=auto|models|grabcut; auto falls back to GrabCut "
                                    "with the reason printed)."),
    root: Path | None = typer.Option(None, "--root", help="Manifest: folder its paths are relative to "
                                                          "(default: the manifest's folder)."),
    size: int | None = typer.Option(None, "--size", help="Manifest: resize targets to size x size (shorter "
                                                         "side, centre crop); default: keep their sizes."),
    ref_size: int | None = typer.Option(None, "--ref-size", help="Manifest: the same for references."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing build in --out."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Build a DIP set: positives, disrupted negatives, M_prior and M_d, as Parquet shards.

    Manifest (JSONL, one record a line; paths relative to the manifest's folder or --root):

    {"prompt": "a dog and a backpack in the jungle", "target": "t.jpg",
    "references": [{"image": "dog.jpg", "mask": "dog_m.png", "class": "dog"}, {"image": "bag.jpg"}],
    "target_masks": ["t_dog.png", "t_bag.png"], "target_boxes": [[0, 0, 256, 256], [256, 0, 512, 256]],
    "id": "r1"}

    Required: prompt, target, references[].image (K references = K subjects, in order). Optional:
    references[].mask (default all-ones, or automatic with --auto-masks), references[].class (the subject's
    class words for the detector; default: the prompt's "a X and a Y" phrases), target_masks (one per
    reference; required without --auto-masks), target_boxes (one pixel box x0, y0, x1, y1 per subject in the
    target, used by --auto-masks instead of the detector), id. A mask is an image of its image's size, subject =
    pixels > 127. Bad records are listed in rejected.jsonl with the reason; the others are built.
    """
    import shlex
    import sys

    from focusdpo.data import build_manifest_dip, build_toy_dip
    from focusdpo.data.builder import BuildStopped
    from focusdpo.data.sources import plugin_extras

    cfg = _load(config, overrides)
    command = shlex.join(["focusdpo", *sys.argv[1:]])
    if (world is None) == (manifest is None) or world not in (None, "toy"):
        typer.secho("give exactly one of --world toy or --manifest FILE.jsonl", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        if world is not None:
            s = build_toy_dip(cfg, out, n=n, seed=seed, patch=patch, overwrite=overwrite, progress=True,
                              command=command, extras=plugin_extras(cfg, toy=True))
        else:
            s = build_manifest_dip(cfg, manifest, out, seed=seed, patch=patch, auto_masks=auto_masks,
                                   overwrite=overwrite, progress=True, command=command, root=root, size=size,
                                   ref_size=ref_size, extras=plugin_extras(cfg, toy=False),
                                   log=lambda m: typer.echo(m, err=True))
    except (BuildStopped, ImportError, OSError, ValueError) as e:  # OSError: FileExistsError, full disk, ...
        typer.secho(f"dip build: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    typer.echo(f"wrote {s.written} records to {s.out_dir} in {s.seconds:.1f} s ({s.records_per_s:.1f} records/s); "
               f"rejected {s.rejected} (listed in {s.out_dir / 'rejected.jsonl'})")
    typer.echo(f"disruptions: {s.disruptions}; subjects: {s.subjects}")
    if s.never_drawn:
        typer.echo(f"note: never drawn (not applicable to these records): {s.never_drawn}")
    if s.written == 0:
        raise typer.Exit(1)


@dip_app.command("show")
def dip_show_cmd(
    path: Path = typer.Argument(..., help="A built DIP folder."),
    out: Path = typer.Option(Path("sheet.png"), "--out", "-o", help="Output PNG."),
    n: int = typer.Option(6, "--n", help="Records to show."),
    start: int = typer.Option(0, "--start", help="Index of the first record shown."),
) -> None:
    """Contact sheet: references | positive | negative | M_prior | M_d for a few records."""
    from focusdpo.data.sheet import render_sheet

    try:
        render_sheet(path, out, n=n, start=start)
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"dip show: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    typer.echo(f"wrote {out}")


def _push(command: str, fn: object, folder: Path, repo: str, private: bool) -> None:
    """Run a :mod:`focusdpo.hub` push and report its commit; Hub errors are named with the fix."""
    from huggingface_hub.errors import HfHubHTTPError

    from focusdpo.hub import HubError

    try:
        url = fn(folder, repo, private=private)
    except (HubError, ValueError, FileNotFoundError) as e:
        _fail(command, e)
    except HfHubHTTPError as e:
        _fail(command, RuntimeError(f"the Hub refused the upload ({e}); check the token (HF_TOKEN or `hf auth "
                                    f"login`) and that it may write to {repo}"))
    typer.echo(f"pushed {folder} to {repo}: {url}")


@dip_app.command("push")
def dip_push_cmd(
    path: Path = typer.Argument(..., help="A built DIP folder (data-*.parquet + card.json)."),
    repo: str = typer.Option(..., "--repo", help="Hub dataset repo id, e.g. me/my-dip (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
) -> None:
    """Upload a DIP set to a Hub dataset repo (shards, card.json and a dataset card); token: HF_TOKEN or
    `hf auth login`."""
    from focusdpo.hub import push_dip

    _push("dip push", push_dip, path, repo, private)


@app.command("push")
def push_cmd(
    run: Path = typer.Argument(..., help="A finished run folder."),
    repo: str = typer.Option(..., "--repo", help="Hub model repo id, e.g. me/my-lora (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
) -> None:
    """Upload a finished run's LoRA (diffusers file, exported if missing), model card, config, metrics and
    sample grid to a Hub model repo; token: HF_TOKEN or `hf auth login`."""
    from focusdpo.hub import push_run

    _push("push", push_run, run, repo, private)


# --- evaluation: eval, generate, data dreambench (engineer "eval") ------------------------------------------


def _fail(command: str, e: Exception) -> NoReturn:
    if _DEBUG["on"]:
        raise e
    typer.secho(f"{command}: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from e


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            _fail("--threads", ValueError(f"--threads {threads} is invalid: allowed >= 1"))
        import torch

        torch.set_num_threads(threads)


@app.command("eval")
def eval_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: metrics.json, report.md, PNG grids/plots."),
    benchmark: str | None = typer.Option(None, "--benchmark", help="toy, dreambench-single or dreambench-multi "
                                                                   "(default: eval.benchmark)."),
    run: list[Path] | None = typer.Option(None, "--run", help="Toy: a trained run folder (repeatable)."),
    base: bool = typer.Option(False, "--base", help="Toy: evaluate the base model too (method 'base')."),
    images: Path | None = typer.Option(None, "--images", help="DreamBench: folder of generated images."),
    data: Path | None = typer.Option(None, "--data", help="DreamBench: folder with dataset/ and the UNO lists."),
    name: str | None = typer.Option(None, "--name", help="DreamBench: method name (default: the images folder)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="DreamBench: score a folder that lacks "
                                                                      "some list entries."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice; 1 is "
                                                               "much faster on a busy machine)."),
    workers: int | None = typer.Option(None, "--workers", help="Toy: sampling processes, one torch thread each "
                                                               "(eval.workers; 2 on a 2-core machine)."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Evaluate: the toy benchmark (base and/or runs) or DreamBench scores of a folder of generated images."""
    cfg = _load(config, ([f"eval.workers={workers}"] if workers else []) + list(overrides or []))
    _set_threads(threads)
    benchmark = benchmark or cfg.eval.benchmark
    if benchmark == "toy":
        from focusdpo.eval.toy import run_toy_command

        try:
            summary = run_toy_command(cfg, run or [], base, out, device=device, log=typer.echo)
        except (ValueError, FileNotFoundError) as e:
            _fail("eval", e)
    elif benchmark in ("dreambench-single", "dreambench-multi"):
        from focusdpo.eval.dreambench import run_dreambench_command

        if images is None or data is None:
            _fail("eval", ValueError(f"--benchmark {benchmark} needs --images DIR and --data DIR"))
        try:
            summary = run_dreambench_command(cfg, benchmark, images, data, out, name, allow_partial, device)
        except (ValueError, FileNotFoundError) as e:
            _fail("eval", e)
    else:
        _fail("eval", ValueError(f"--benchmark {benchmark!r} is invalid: allowed toy, dreambench-single, "
                                 "dreambench-multi"))
    typer.echo(summary)


@app.command("generate")
def generate_cmd(
    benchmark: str = typer.Option(..., "--benchmark", help="dreambench-single or dreambench-multi."),
    data: Path = typer.Option(..., "--data", help="DreamBench folder with dataset/ and the UNO lists."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder of <index>_<subjects>_<seed>.png images."),
    run: Path | None = typer.Option(None, "--run", help="A trained run folder (default: the base model)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N list entries (smoke test)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Generate the DreamBench images (the protocol's prompts, seeds and sizes) that `focusdpo eval` scores."""
    from focusdpo.eval.generate import generate_dreambench

    cfg = _load(config, overrides)
    _set_threads(threads)
    try:
        paths = generate_dreambench(cfg, benchmark, data, out, run_dir=run, device=device, limit=limit,
                                    progress=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        _fail("generate", e)
    typer.echo(f"{len(paths)} images in {out}")


data_app = typer.Typer(help="Public evaluation data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("dreambench")
def data_dreambench_cmd(
    dest: Path = typer.Option(..., "--dest", help="Folder to write dataset/, the text files and the UNO lists."),
) -> None:
    """Download DreamBench (google/dreambooth, CC BY 4.0) and UNO's evaluation lists (needs a network)."""
    from focusdpo.eval.dreambench_data import fetch_dreambench

    try:
        counts = fetch_dreambench(dest)
    except (OSError, ValueError) as e:
        _fail("data dreambench", e)
    typer.echo(f"DreamBench in {dest}: {counts}")


# --- backbone: pretrain, sample (engineer "backbone") ---------------------------------------------------------


@app.command("pretrain")
def pretrain_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: model.safetensors, config.yaml, pretrain.log, "
                                                      "state/ (resumed when present)."),
    subjects: str = typer.Option("1,2,3", "--subjects", help="Subject counts K drawn uniformly per batch."),
    text_dropout: float = typer.Option(0.1, "--text-dropout", help="Probability of the empty prompt (guidance)."),
    ema_decay: float = typer.Option(0.999, "--ema-decay", help="EMA decay of the saved weights."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing state/ in --out and start over."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Shorthand for train.max_steps=N."),
    stop_at: int | None = typer.Option(None, "--stop-at", help="Stop after step N (the LR schedule still "
                                                               "runs to train.max_steps; resume later)."),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    init: str | None = typer.Option(None, "--init", help="Warm start from a flux-tiny checkpoint (file or run "
                                                          "folder; 'shipped': the packaged base): its weights start "
                                                          "a new run at step 0. Ignored when --out has a state/."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Pretrain the built-in tiny base on the synthetic world (flow matching on positives), resumable."""
    import torch

    from focusdpo.train.pretrain import PretrainOptions, pretrain

    cfg = _load(config, list(overrides or []) + ([f"train.max_steps={max_steps}"] if max_steps else []))
    torch.set_num_threads(threads)
    try:
        counts = tuple(int(k) for k in subjects.split(","))
        opts = PretrainOptions(subject_counts=counts, text_dropout=text_dropout, ema_decay=ema_decay,
                               stop_at=stop_at, init=init)
        path = pretrain(cfg, out, opts, device=device, resume=not fresh, log=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        _fail("pretrain", e)
    typer.echo(f"wrote {path}")


@app.command("sample")
def sample_cmd(
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="Output PNG grid."),
    run: Path | None = typer.Option(None, "--run", help="A trained run folder (its LoRA); default: the base."),
    n: int = typer.Option(8, "--n", help="World scenes to sample (without --prompt)."),
    subjects: int = typer.Option(2, "--subjects", help="Subjects per world scene (1-3)."),
    split: str = typer.Option("heldout", "--split", help="World identities: heldout or train."),
    prompt: str | None = typer.Option(None, "--prompt", help="Your prompt (needs --ref, one per subject)."),
    ref: list[Path] | None = typer.Option(None, "--ref", help="Reference image, in order of mention (repeatable)."),
    size: int | None = typer.Option(None, "--size", help="Output side in pixels (default world.scene_size)."),
    ref_size: int | None = typer.Option(None, "--ref-size", help="Reference side (default world.ref_size)."),
    seed: int | None = typer.Option(None, "--seed", help="Noise and scene seed (default sample.seed)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Sample images; the PNG grid shows each row's references, then the sample (then the world's truth)."""
    from PIL import Image

    from focusdpo.eval.methods import load_method
    from focusdpo.sampling import generate, read_image, sample_grid, world_inputs

    cfg = _load(config, overrides)
    seed = cfg.sample.seed if seed is None else seed
    side = size or cfg.world.scene_size
    try:
        truth = []
        if prompt is not None:
            if not ref:
                raise ValueError("--prompt needs at least one --ref image")
            prompts, refs = [prompt], [read_image(str(p), ref_size or cfg.world.ref_size) for p in ref]
        else:
            from focusdpo.world import World

            prompts, refs, scenes = world_inputs(World(cfg.world), n, subjects, split, seed)
            truth = [scenes]
        backbone = load_method(cfg, run, device, check_world=False)
        images = generate(backbone, prompts, refs, (side, side), cfg.sample, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        _fail("sample", e)
    Image.fromarray(sample_grid(refs, [images.cpu(), *truth])).save(out)
    typer.echo(f"wrote {out}: {len(prompts)} samples")


# --- training: train, focus-map (engineer "trainer") ------------------------------------------------------------


@app.command("train")
def train_cmd(
    resume: bool = typer.Option(False, "--resume", help="Continue train.output_dir from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in train.output_dir (its "
                                                              "checkpoints, metrics, LoRA) by a new one."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the estimated memory budget of a step and exit "
                                                          "(no training, no weights loaded; docs/performance.md)."),
    size: int | None = typer.Option(None, "--size", help="--dry-run: target side in pixels (default: 512, "
                                                         "flux-tiny: world.scene_size)."),
    refs: int = typer.Option(1, "--refs", min=1, help="--dry-run: references per pair."),
    ref_size: int | None = typer.Option(None, "--ref-size", help="--dry-run: reference side (default: --size)."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Post-train the LoRA (train.objective: sft, dpo, patchdpo, focusdpo) on DIP data; works under
    `accelerate launch -m focusdpo train`."""
    from focusdpo.config import ConfigError
    from focusdpo.train.checkpoint import CheckpointError
    from focusdpo.train.run_folder import RunFolderError
    from focusdpo.train.trainer import TrainingError, TrainingInterrupted, train

    cfg = _load(config, overrides)
    if dry_run:
        from focusdpo.train.budget import estimate_budget

        try:
            typer.echo(estimate_budget(cfg, size, refs, ref_size).table())
        except (ConfigError, ValueError, OSError) as e:
            _fail("train --dry-run", e)
        return
    try:
        run_dir = train(cfg, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as e:
        typer.secho(str(e), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from e
    except TrainingError as e:
        typer.secho(f"train: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
    except (ConfigError, CheckpointError, RunFolderError, FileNotFoundError, ValueError) as e:  # bad inputs
        _fail("train", e)
    typer.echo(f"run folder: {run_dir}")


@app.command("focus-map")
def focus_map_cmd(
    run: Path | None = typer.Option(None, "--run", help="A run folder (its config.yaml and LoRA); default: the "
                                                        "base model of --config."),
    record: str = typer.Option("0", "--record", help="DIP record id, or index in the run's DIP set."),
    out: Path = typer.Option(Path("focus-map.png"), "--out", "-o", help="Output PNG."),
    sigmas: str = typer.Option("0.9,0.7,0.5,0.3,0.1", "--sigmas", help="Timesteps s in (0, 1], comma-separated."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise shared by all timesteps."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """PNG strip of M', M_s/A, M_d, the gate and W across timesteps for one DIP record: where the method looks."""
    from focusdpo.train.focus_strip import focus_map_command

    if run is not None and config is None:
        config = run / "config.yaml"
    cfg = _load(config, overrides)
    try:
        values = [float(v) for v in sigmas.split(",") if v.strip()]
        path = focus_map_command(cfg, run, record, out, values, seed, device)
    except (ValueError, FileNotFoundError) as e:
        _fail("focus-map", e)
    typer.echo(f"wrote {path}")


@app.command("focus-probe")
def focus_probe_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: probe.json, probe.md, probe.png."),
    run: Path | None = typer.Option(None, "--run", help="A run folder (its config.yaml and LoRA)."),
    base: bool = typer.Option(False, "--base", help="Probe the base model of --config (the default without --run)."),
    dip: Path | None = typer.Option(None, "--dip", help="A DIP set whose positives to probe (any backbone); "
                                                        "default: held-out toy scenes with 2 and 3 subjects."),
    n: int = typer.Option(64, "--n", help="Toy scenes per subject count, or DIP records."),
    draws: int = typer.Option(4, "--draws", help="Noise draws per positive and timestep."),
    blocks: str = typer.Option("", "--blocks", help="Comma-separated blocks to probe (double:i, single:i, all); "
                                                    "default: every block and all."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """How well each SPAF readout (attention field, cosine) finds the subjects, per block and noise level."""
    from focusdpo.eval.probe import focus_probe_command

    if run is not None and base:
        _fail("focus-probe", ValueError("give --run DIR or --base, not both"))
    if run is not None and config is None:
        config = run / "config.yaml"
    cfg = _load(config, overrides)
    if n < 1 or draws < 1:
        _fail("focus-probe", ValueError(f"--n={n} and --draws={draws} are invalid: allowed >= 1"))
    try:
        chosen = [b.strip() for b in blocks.split(",") if b.strip()] or None
        result = focus_probe_command(cfg, run, dip, out, n, draws, chosen, device, log=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        _fail("focus-probe", e)
    best = max(result["readouts"].items(), key=lambda kv: kv[1]["a_train"])
    typer.echo(f"default {result['default']}: a_train {result['readouts'][result['default']]['a_train']:.2f}"
               if result["default"] in result["readouts"] else f"default {result['default']} not probed")
    typer.echo(f"best {best[0]}: a_train {best[1]['a_train']:.2f}; chance {result['chance']['a_train']:.2f}, "
               f"ceiling {result['ceiling']['a_train']:.2f}")
    typer.echo(f"wrote {Path(out) / 'probe.json'}, probe.md, probe.png")


@app.command("export-lora")
def export_lora_cmd(
    run: Path = typer.Argument(..., help="A finished run folder (its lora.safetensors)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: the run folder)."),
    bf16: bool = typer.Option(False, "--bf16", help="Store bfloat16 weights (half the size)."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers (pytorch_lora_weights.safetensors) or uno "
                                                           "(dit_lora.safetensors in UNO's own key format)."),
    uno_lora: Path | None = typer.Option(None, "--uno-lora", help="The UNO LoRA the run merged (default: the "
                                                                   "run's model.flux.lora_import)."),
) -> None:
    """Write the run's LoRA for other tools: diffusers naming for FluxPipeline.load_lora_weights(folder), or
    UNO's format, and its model card (README.md) beside it. A run on UNO (model.flux.lora_import) gets UNO's LoRA
    and ours as one file."""
    import torch

    from focusdpo.backbones.lora_export import export_run
    from focusdpo.train.model_card import write_model_card

    try:
        path = export_run(run, out, torch.bfloat16 if bf16 else torch.float32, fmt, uno_lora)
        card = write_model_card(run, path.parent) if (run / "config.yaml").is_file() else None
    except (ValueError, FileNotFoundError) as e:
        _fail("export-lora", e)
    typer.echo(f"wrote {path}")
    typer.echo(f"wrote {card}" if card else f"no model card: {run} has no config.yaml (not a focusdpo run folder)")
    if fmt == "uno":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            typer.echo(f"UNO rank {f.metadata()['rank']}: pass --lora_rank {f.metadata()['rank']} to UNO's inference")


def cache_latents_command(cfg, device: str = "cpu", batch_size: int = 8, progress=None) -> dict[str, tuple[int, int]]:
    """``focusdpo cache-latents`` on the DIP set ``cfg.data.path`` read with ``DipDataset``; see
    :func:`focusdpo.backbones.flux_pretrained.cache_latents` (returns its cache hit/miss counts)."""
    from focusdpo.backbones.flux_pretrained import cache_latents
    from focusdpo.data.dataset import DipDataset
    from focusdpo.train.presets import effective_config

    return cache_latents(effective_config(cfg), DipDataset, device, batch_size, progress)  # train.memory's cache too


@app.command("cache-latents")
def cache_latents_cmd(
    device: str = typer.Option("cpu", "--device", help="Torch device of the VAE, e.g. cuda:0."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images encoded together."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Encode a DIP set's images (VAE) and prompts (T5 + CLIP) into model.<backbone>.latent_cache, ahead of training."""
    from focusdpo.train.presets import effective_config

    cfg = _load(config, overrides)
    try:
        counts = cache_latents_command(cfg, device, batch_size)
    except (ValueError, FileNotFoundError) as e:
        _fail("cache-latents", e)
    (img_hits, img_new), (txt_hits, txt_new) = counts["images"], counts["prompts"]
    typer.echo(f"encoded {img_new} image(s) and {txt_new} prompt(s); {img_hits} image(s) and {txt_hits} prompt(s) "
               f"were already cached in {effective_config(cfg).model.options.latent_cache}")


# --- the main job: demo, compare (lead) ----------------------------------------------------------------------


@app.command("demo")
def demo_cmd(
    quick: bool = typer.Option(False, "--quick", help="A smaller budget: under 2 minutes on 2 CPU cores."),
    on_policy: bool = typer.Option(False, "--on-policy", help="On-policy DIP: the policy regenerates subject regions "
                                                              "every 25 steps, the toy judge keeps the worse pairs "
                                                              "(data.refresh_*; about the default demo's time)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default: runs/demo-<time>)."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """The main job: toy DIP set -> FocusDPO post-training of the shipped base -> held-out evaluation -> report."""
    import json

    from focusdpo.demo import demo_config, run_demo
    from focusdpo.eval.report import difference_lines, toy_markdown

    try:
        cfg = demo_config(_load(config, None), quick, overrides or [], on_policy=on_policy)
    except ValueError as e:
        _fail("demo", e)
    folder = run_demo(cfg, out, log=typer.echo)
    metrics = json.loads((folder / "metrics.json").read_text())
    typer.echo(toy_markdown(metrics).split("\n## ")[0])
    for line in difference_lines(metrics, cfg.eval.target_effect, refs=("base",)):
        typer.echo(line)  # a difference is called only when its interval excludes 0
    typer.echo(f"report: {folder / 'report.md'}")


@app.command("compare")
def compare_cmd(
    variants: str = typer.Option("sft,dpo,patchdpo,focusdpo,focusdpo-no-spaf,focusdpo-no-dpce,focusdpo-no-gate",
                                 "--variants", help="Comma-separated methods and ablations to train and compare."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated training seeds."),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Output folder (finished runs are reused)."),
    train_only: bool = typer.Option(False, "--train-only", help="Only train (e.g. one process per variant); "
                                                                "run again without it to evaluate."),
    workers: int = typer.Option(2, "--workers", help="Evaluation processes, one torch thread each (eval.workers; "
                                                     "a later eval.workers=N override wins)."),
    config: Path | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
) -> None:
    """Train each method with the same data and budget over several seeds; evaluate all against the base.

    The evaluation defaults to 192 scenes per subject count and sampling seeds 0, 1 (sized to detect a 0.01
    paired difference; eval.n_scenes=... and eval.seeds=[...] override it).
    """
    import shlex
    import sys

    from focusdpo.compare import EVAL_BUDGET, compare

    cfg = _load(config, [*EVAL_BUDGET, f"eval.workers={workers}", *(overrides or [])])
    command = "focusdpo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        compare(cfg, [v.strip() for v in variants.split(",") if v.strip()],
                [int(s) for s in seeds.split(",") if s.strip()], out, command=command, log=typer.echo,
                train_only=train_only)
    except ValueError as e:
        _fail("compare", e)
    if not train_only:
        typer.echo((out / "results.md").read_text())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
