"""``focusdpo focus-probe``: how well each SPAF readout finds the subjects, per tapped block and noise level.

For positives whose subject regions ``P_k`` are known (ground-truth renders of held-out toy scenes with 2 and
3 subjects, or the positives of any DIP set, real FLUX included), each positive is noised to
``s`` in :data:`SIGMAS` with ``draws`` fixed noise draws, the backbone runs once per (tapped block, ``s``,
draw) with the focus tap, and every readout (``attention``, ``cosine``, ``cosine_centered``) is scored with
SPAF's own rule (:func:`~focusdpo.focus.claim_tokens` with ``k_k = ceil(rho |P_k|)``, then
:func:`~focusdpo.focus.focus_sets`):

- ``a``: the alignment, the share of subject tokens that the right subject claims (what the gate and ``A``
  use), mean over positives and draws;
- ``confusion``: the share of subject-k tokens claimed by *another* subject (leakage as SPAF sees it).

Reference lines under the same rule: ``chance`` (uniformly random scores) and ``ceiling`` (scores = the true
regions). ``a_train`` is the expected ``a`` under the trainer's timestep distribution (``loss.logit_mean``,
``loss.logit_std``, ``loss.time_shift``): ``a(s)`` interpolated linearly between the probed ``s`` (held
constant beyond the ends) and averaged over 100,000 draws of ``s``.

Outputs (``out``): ``probe.json`` (schema below), ``probe.md`` (tables) and ``probe.png`` (heatmap of ``a``)::

    {"readouts": {"<readout>@<block>": {"a": {"0.1": x, ...}, "confusion": {...}, "a_train": x}},
     "chance": {"a": {...}, "confusion": {...}, "a_train": x}, "ceiling": {...},
     "default": "<readout>@<tap_layer>", "sigmas": [...], "n_positives": n, "draws": d, "source": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from focusdpo.backbones.base import Backbone
from focusdpo.backbones.diffusion import FLOW, Diffusion, diffusion_of
from focusdpo.config import Config
from focusdpo.focus import READOUTS, claim_tokens, focus_sets, pool_to_tokens, readout_scores, subject_top_k

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
PROBE_SEED = 20_251_130
TRAIN_SEED = 20_251_131  # scenes of training identities, for tuning (never the evaluation's held-out scenes)


# ------------------------------------------------------------------------------------------------- inputs


def toy_batches(cfg: Config, n_scenes: int, counts: Sequence[int] = (2, 3), batch_size: int = 32,
                split: str = "heldout") -> Iterator[dict[str, Any]]:
    """Toy scenes as probe batches: ground-truth positive, references, masks. ``split="heldout"``: the
    evaluation's held-out scenes; ``"train"``: scenes of training identities (for tuning, :data:`TRAIN_SEED`).

    Each batch: ``positive [B, 3, S, S]``, K ``references [B, 3, R, R]``, K ``ref_masks [B, R, R]``,
    ``regions [B, K, S, S]`` (float 0/1), ``prompt`` (list of str).
    """
    from focusdpo.eval.toy import heldout_scenes
    from focusdpo.world import World

    def image(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float().div(255)

    world = World(cfg.world)
    if split == "heldout":
        scenes = heldout_scenes(world, n_scenes, counts)
    elif split == "train":
        scenes = {k: [world.sample_scene(rng, "train", k) for _ in range(n_scenes)]
                  for k in counts for rng in [np.random.default_rng([TRAIN_SEED, k])]}
    else:
        raise ValueError(f"split={split!r} is invalid: allowed heldout, train")
    for k in counts:
        for start in range(0, n_scenes, batch_size):
            part = scenes[k][start:start + batch_size]
            yield {"positive": image([s.image for s in part]),
                   "references": [image([s.references[i] for s in part]) for i in range(k)],
                   "ref_masks": [torch.from_numpy(np.stack([s.ref_masks[i] for s in part])).float()
                                 for i in range(k)],
                   "regions": torch.from_numpy(np.stack([s.masks for s in part])).float(),
                   "prompt": [s.prompt for s in part]}


def dip_batches(path: str | Path, n: int, batch_size: int = 16) -> Iterator[dict[str, Any]]:
    """The first ``n`` records of a DIP set as probe batches (same keys as :func:`toy_batches`), bucketed so a
    batch holds records of one size and subject count."""
    from focusdpo.data.dataset import DipDataset, collate_dip

    dataset = DipDataset(Path(path))
    groups: dict[tuple, list[int]] = {}
    for i in range(min(n, len(dataset))):
        item = dataset[i]
        key = (len(item["references"]), tuple(item["positive"].shape), tuple(r.shape for r in item["references"]))
        groups.setdefault(key, []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            yield collate_dip([dataset[i] for i in indices[start:start + batch_size]])


# ---------------------------------------------------------------------------------------------- measuring


def _rule_stats(scores: torch.Tensor, regions: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``confusion`` ``[B]`` of scores ``[B, K, N]`` under SPAF's top-k rule on regions ``[B, K, N]``."""
    matches = claim_tokens(scores, subject_top_k(regions, rho))
    sets = focus_sets(matches, regions)
    member = sets["member"]  # [B, K, N]
    claimed_by_other = matches.any(dim=1, keepdim=True) & ~matches  # another subject owns the token
    wrong = (member & claimed_by_other).flatten(1).sum(1).float()
    return sets["a"], wrong / member.flatten(1).sum(1).float().clamp_min(1)


def _encode(backbone: Backbone, batch: dict[str, Any]) -> tuple[Any, ...]:
    with torch.no_grad():
        x0 = backbone.encode_images(batch["positive"])
        refs = [backbone.encode_images(r) for r in batch["references"]]
        text = backbone.encode_prompts(batch["prompt"])
    device, patch = x0.tokens.device, backbone.patch
    regions = pool_to_tokens(batch["regions"].to(device), patch).flatten(2).float()
    ref_masks = [pool_to_tokens(m.to(device), patch).flatten(1).float() for m in batch["ref_masks"]]
    return x0, refs, text, regions, ref_masks


def probe_batch(backbone: Backbone, batch: dict[str, Any], blocks: Sequence[str], cfg: Config, draws: int,
                seed: int, sigmas: Sequence[float] = SIGMAS) -> dict[str, dict[float, list[np.ndarray]]]:
    """Per-positive ``a`` and confusion of every ``readout@block`` and of chance / ceiling at each ``s``.

    Returns ``{name: {s: [a values [B*draws], confusion values [B*draws]]}}``.
    """
    x0, refs, text, regions, ref_masks = _encode(backbone, batch)
    out: dict[str, dict[float, list[np.ndarray]]] = {}

    def add(name: str, s: float, a: torch.Tensor, conf: torch.Tensor) -> None:
        slot = out.setdefault(name, {}).setdefault(s, [np.empty(0), np.empty(0)])
        slot[0], slot[1] = np.concatenate([slot[0], a.cpu().numpy()]), np.concatenate([slot[1], conf.cpu().numpy()])

    gen = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        eps = torch.randn(x0.tokens.shape, generator=gen).to(x0.tokens.device, x0.tokens.dtype)
        chance = torch.rand(regions.shape, generator=gen).to(regions.device)
        for s in sigmas:
            add("chance", s, *_rule_stats(chance, regions, cfg.focus.rho))
            add("ceiling", s, *_rule_stats(regions, regions, cfg.focus.rho))
            t = torch.full((x0.tokens.shape[0],), float(s), device=x0.tokens.device)
            x_t, _ = diffusion_of(backbone).noisy(x0.tokens, eps, t)
            for block in blocks:
                backbone.tap_layer = block
                with torch.no_grad():
                    _, tap = backbone.predict(x_t, t, text, refs, x0.grid, tap=True, ref_masks=ref_masks)
                for readout in READOUTS:
                    scores = readout_scores(readout, tap.field, tap.target, tap.refs, ref_masks)
                    add(f"{readout}@{block}", s, *_rule_stats(scores, regions, cfg.focus.rho))
    return out


def train_sigmas(cfg: Config, n_tokens: int, n: int = 100_000, diffusion: Diffusion = FLOW) -> np.ndarray:
    """``n`` timesteps ``s`` drawn as the trainer draws them (``diffusion.draw``, flow matching by default)."""
    _, s = diffusion.draw(torch.Generator().manual_seed(0), n, (1, 1), n_tokens, cfg.loss)
    return s.numpy()


def expected_under(values: dict[float, float], s_train: np.ndarray) -> float:
    """``E[a(s)]`` over the trainer's ``s``: linear interpolation between probed ``s``, constant beyond the ends."""
    xs = sorted(values)
    return float(np.interp(s_train, xs, [values[x] for x in xs]).mean())


def summarise_probe(raw: dict[str, dict[float, list[np.ndarray]]], s_train: np.ndarray) -> dict[str, dict]:
    """Means per ``s`` and ``a_train`` of every entry of :func:`probe_batch` (merged over batches)."""
    out = {}
    for name, by_s in raw.items():
        a = {s: float(np.mean(v[0])) for s, v in by_s.items()}
        conf = {s: float(np.mean(v[1])) for s, v in by_s.items()}
        out[name] = {"a": {f"{s:g}": x for s, x in sorted(a.items())},
                     "confusion": {f"{s:g}": x for s, x in sorted(conf.items())},
                     "a_train": expected_under(a, s_train)}
    return out


def _merge(into: dict, part: dict) -> None:
    for name, by_s in part.items():
        for s, (a, conf) in by_s.items():
            slot = into.setdefault(name, {}).setdefault(s, [np.empty(0), np.empty(0)])
            slot[0], slot[1] = np.concatenate([slot[0], a]), np.concatenate([slot[1], conf])


def run_probe(cfg: Config, backbone: Backbone, batches: Iterator[dict[str, Any]], out_dir: str | Path,
              blocks: Sequence[str] | None = None, draws: int = 4, source: str = "",
              log: Callable[[str], None] | None = None) -> dict:
    """Probe every readout on ``blocks`` (default: each block of the backbone and ``all``); write the outputs.

    Returns the ``probe.json`` dict (module docstring).
    """
    default = f"{cfg.focus.readout}@{_block_label(backbone, cfg.focus.tap_layer)}"
    blocks = list(blocks) if blocks else [*getattr(backbone, "block_names", []), "all"]
    raw: dict = {}
    n_pos, n_tokens = 0, None
    for i, batch in enumerate(batches):
        _merge(raw, probe_batch(backbone, batch, blocks, cfg, draws, seed=PROBE_SEED + i))
        n_pos += batch["positive"].shape[0]
        n_tokens = n_tokens or backbone.token_grid(tuple(batch["positive"].shape[-2:]))
        if log:
            log(f"probed {n_pos} positives")
    if not n_pos:
        raise ValueError("focus-probe: no positives to probe (empty DIP set or --n 0)")
    backbone.tap_layer = cfg.focus.tap_layer
    summary = summarise_probe(raw, train_sigmas(cfg, n_tokens[0] * n_tokens[1], diffusion=diffusion_of(backbone)))
    result = {"readouts": {k: v for k, v in summary.items() if k not in ("chance", "ceiling")},
              "chance": summary["chance"], "ceiling": summary["ceiling"], "default": default,
              "sigmas": list(SIGMAS), "n_positives": n_pos, "draws": draws, "source": source}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    (out / "probe.md").write_text(probe_markdown(result))
    plot_probe(result, out / "probe.png")
    return result


def _block_label(backbone: Backbone, spec: Any) -> str:
    """The name ``spec`` resolves to on ``backbone`` (``all`` or one block name)."""
    previous = backbone.tap_layer
    backbone.tap_layer = spec
    label = backbone.tap_layer
    backbone.tap_layer = previous
    return label


def _ranked(result: dict) -> list[tuple[str, dict]]:
    return sorted(result["readouts"].items(), key=lambda kv: -kv[1]["a_train"])


def probe_markdown(result: dict) -> str:
    """Tables of ``a`` and confusion per readout@block and ``s``, best ``a_train`` first."""
    sig = [f"{s:g}" for s in result["sigmas"]]
    head = "| readout@block | " + " | ".join(f"a @ s={s}" for s in sig) + " | a_train | confusion @ s=0.5 |\n"
    head += "|---" * (len(sig) + 3) + "|\n"

    def row(name: str, v: dict) -> str:
        mark = " (default)" if name == result["default"] else ""
        return (f"| {name}{mark} | " + " | ".join(f"{v['a'][s]:.2f}" for s in sig)
                + f" | {v['a_train']:.2f} | {v['confusion'].get('0.5', float('nan')):.2f} |\n")

    rows = "".join(row(n, v) for n, v in _ranked(result))
    rows += row("chance (random scores)", result["chance"]) + row("ceiling (true regions)", result["ceiling"])
    return (f"# Focus probe\n\nSource: {result['source']}; {result['n_positives']} positives x {result['draws']} "
            f"noise draws. `a`: share of subject tokens that the right subject claims under SPAF's top-k rule; "
            f"`a_train`: its expectation under the trainer's timestep distribution; confusion: share of subject "
            f"tokens claimed by another subject. Current config: `{result['default']}`.\n\n" + head + rows)


def plot_probe(result: dict, path: Path) -> None:
    """Heatmap of ``a`` (rows: readout@block, best first, then chance and ceiling; columns: ``s``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = _ranked(result) + [("chance", result["chance"]), ("ceiling", result["ceiling"])]
    sig = [f"{s:g}" for s in result["sigmas"]]
    grid = np.array([[v["a"][s] for s in sig] for _, v in entries])
    fig, ax = plt.subplots(figsize=(1.1 * len(sig) + 3, 0.28 * len(entries) + 1.2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sig)), [f"s={s}" for s in sig])
    ax.set_yticks(range(len(entries)), [n for n, _ in entries], fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="alignment a")
    ax.set_title("SPAF readouts: alignment by noise level")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def focus_probe_command(cfg: Config, run_dir: str | Path | None, dip: str | Path | None, out: str | Path,
                        n: int = 64, draws: int = 4, blocks: Sequence[str] | None = None,
                        device: str = "cpu", log: Callable[[str], None] | None = None) -> dict:
    """``focusdpo focus-probe``: the base (``run_dir`` None) or a run's policy, on toy scenes or a DIP set."""
    from focusdpo.eval.methods import load_method

    backbone = load_method(cfg, run_dir, device, check_world=dip is None, allow_checkpoint=True)
    backbone.trainable().eval()
    if dip is None:
        batches, source = toy_batches(cfg, n), f"toy world, {n} held-out scenes with 2 and with 3 subjects"
    else:
        batches, source = dip_batches(dip, n), f"DIP set {dip} (first {n} records)"
    who = "base" if run_dir is None else f"run {run_dir}"
    return run_probe(cfg, backbone, batches, out, blocks, draws, f"{source}; {who}", log)
