"""Cost of the adaptive focus at FLUX size, next to naive per-token / per-patch reference implementations.

Measures, in one run and on one device:

- SPAF + weights: ``match_subjects`` + ``focus_weights`` for B=2, N=1024 target tokens (512x512 FLUX latents),
  K=2 references of 1024 tokens each, D=3072 (the FLUX hidden width); naive reference: Python loops over
  samples, subjects and tokens (numpy dot products per token, ``sorted`` for the top-k, a per-token loop
  for the sets and weights).
- DPCE: ``complexity_map`` for 16 images of 512x512, patch 16; naive reference: numpy luminance and blur,
  then a Python loop over patches with one ``np.bincount`` histogram each.

Each pair is checked to agree (same matches, weights and maps) before its timings are printed. Times are
medians over ``--repeats`` runs after one warm-up. Usage::

    python benchmarks/bench_focus.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from focusdpo.config import FocusConfig
from focusdpo.focus import complexity_map, focus_weights, match_subjects, subject_top_k


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spaf_inputs(device: torch.device, dtype: torch.dtype, b: int = 2, n: int = 1024, m: int = 1024,
                d: int = 3072, k: int = 2) -> dict:
    """FLUX-sized SPAF inputs: subject regions are 32x32-token rectangles, target tokens near them are
    their subject's pooled feature plus noise, so matching has real structure."""
    gen = torch.Generator().manual_seed(0)
    refs = [torch.randn(b, m, d, generator=gen) for _ in range(k)]
    ref_masks = [(torch.rand(b, m, generator=gen) < 0.5).float() for _ in range(k)]
    grid = torch.zeros(b, k, 32, 32)
    grid[:, 0, 4:16, 4:18] = 1.0
    grid[:, 1, 18:30, 12:28] = 1.0
    grid[:, 1, 18, 12:28] = 0.5  # a soft edge row, still a member
    regions = grid.flatten(2)
    tgt = torch.randn(b, n, d, generator=gen)
    for s in range(k):
        pooled = (refs[s] * ref_masks[s][..., None]).sum(1) / ref_masks[s].sum(1, keepdim=True)
        inside = regions[:, s] > 0
        noisy = pooled[:, None] + 1.5 * torch.randn(b, n, d, generator=gen) * pooled.std()
        tgt = torch.where(inside[..., None], noisy, tgt)
    gen_md = torch.rand(b, n, generator=gen)
    return {"tgt": tgt.to(device, dtype), "refs": [r.to(device, dtype) for r in refs],
            "ref_masks": [mk.to(device, dtype) for mk in ref_masks], "regions": regions.to(device, dtype),
            "m_d": gen_md.to(device, dtype)}


def fast_spaf(x: dict, cfg: FocusConfig) -> tuple[torch.Tensor, torch.Tensor]:
    matches, _ = match_subjects(x["tgt"], x["refs"], x["ref_masks"], subject_top_k(x["regions"], cfg.rho))
    w, _ = focus_weights(matches, x["regions"], x["m_d"], cfg)
    return matches, w


def naive_spaf(x: dict, cfg: FocusConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-token Python loops; the weights are plain W_raw / mean (the floor never binds at defaults)."""
    tgt = x["tgt"].float().cpu().numpy()
    refs = [r.float().cpu().numpy() for r in x["refs"]]
    masks = [mk.float().cpu().numpy() for mk in x["ref_masks"]]
    regions, m_d = x["regions"].float().cpu().numpy(), x["m_d"].float().cpu().numpy()
    b, n, _ = tgt.shape
    k = len(refs)
    matches = np.zeros((b, k, n), dtype=bool)
    weights = np.zeros((b, n))
    for bi in range(b):
        scores = np.zeros((k, n))
        claimed = np.zeros((k, n), dtype=bool)
        for s in range(k):
            acc, total = np.zeros(tgt.shape[2], dtype=np.float32), 0.0
            for j in range(refs[s].shape[1]):
                acc += masks[s][bi, j] * refs[s][bi, j]
                total += masks[s][bi, j]
            r = acc / total
            for t in range(n):
                scores[s, t] = float(tgt[bi, t] @ r) / (np.linalg.norm(tgt[bi, t]) * np.linalg.norm(r))
            top = math.ceil(cfg.rho * regions[bi, s].sum() - 1e-4)
            for t in sorted(range(n), key=lambda t, s=s: -scores[s, t])[:top]:
                claimed[s, t] = True
        for t in range(n):
            owners = [s for s in range(k) if claimed[s, t]]
            if owners:
                matches[bi, max(owners, key=lambda s, t=t: scores[s, t]), t] = True
        weights[bi] = _naive_weights(matches[bi], regions[bi], m_d[bi], cfg)
    return matches, weights


def _naive_weights(matches: np.ndarray, regions: np.ndarray, m_d: np.ndarray, cfg: FocusConfig) -> np.ndarray:
    k, n = regions.shape
    member = [[regions[s, t] >= 0.5 for s in range(k)] for t in range(n)]
    aligned = [any(matches[s, t] and member[t][s] for s in range(k)) for t in range(n)]
    in_union = [any(member[t]) for t in range(n)]
    a = sum(aligned) / max(1, sum(in_union))
    gate = (a >= cfg.tau) if cfg.dynamic else True
    raw = []
    for t in range(n):
        confused = in_union[t] and not aligned[t]
        detail = m_d[t] if in_union[t] else 0.0
        value = 1 + cfg.alpha_s * confused - cfg.alpha_a * aligned[t] + gate * cfg.alpha_d * detail
        raw.append(max(cfg.w_min, value))
    raw = np.array(raw)
    return raw / raw.mean()


def naive_complexity(images: np.ndarray, patch: int, sigma: float, bins: int) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] -> ``[B, H/patch, W/patch]``: numpy blur, Python loop over patches."""
    radius = max(1, math.ceil(3 * sigma))
    kernel = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    b, _, height, width = images.shape
    out = np.zeros((b, height // patch, width // patch))
    for bi in range(b):
        lum = 0.299 * images[bi, 0] + 0.587 * images[bi, 1] + 0.114 * images[bi, 2]
        pad = np.pad(lum, radius, mode="edge")
        rows = sum(kernel[i] * pad[:, i:i + width] for i in range(2 * radius + 1))
        lum = sum(kernel[i] * rows[i:i + height] for i in range(2 * radius + 1))
        q = np.minimum(np.floor(lum * bins), bins - 1).astype(np.int64)
        for i in range(height // patch):
            for j in range(width // patch):
                counts = np.bincount(q[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].ravel(), minlength=bins)
                p = counts[counts > 0] / counts.sum()
                out[bi, i, j] = -(p * np.log(p)).sum() / math.log(bins)
    return out


def complexity_images(device: torch.device, dtype: torch.dtype, b: int = 16, size: int = 512) -> torch.Tensor:
    """Smooth random scenes with noisy patches: a mix of flat and detailed tokens."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.rand(b, 3, size // 32, size // 32, generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.rand(b, 1, size // 64, size // 64, generator=gen).repeat_interleave(64, -1).repeat_interleave(64, -2)
    images = images + (noise > 0.5) * 0.3 * torch.rand(b, 3, size, size, generator=gen)
    return images.clamp(0, 1).to(device, dtype)


def bench_spaf(device: torch.device, dtype: torch.dtype, repeats: int) -> list[tuple[str, float, float, str]]:
    cfg = FocusConfig()
    x = spaf_inputs(device, dtype)
    matches, w = fast_spaf(x, cfg)
    naive_matches, naive_w = naive_spaf(x, cfg)
    differ = int((matches.cpu().numpy() != naive_matches).sum())
    w_err = float(np.abs(w.float().cpu().numpy() - naive_w).max())
    check = f"{differ} match(es) differ, max |dW| {w_err:.1e}"
    fast_t = _time(lambda: fast_spaf(x, cfg), repeats, device)
    naive_t = _time(lambda: naive_spaf(x, cfg), max(1, repeats // 2), device)
    return [("match_subjects + focus_weights (B=2 N=1024 K=2x1024 D=3072)", fast_t, naive_t, check)]


def bench_dpce(device: torch.device, dtype: torch.dtype, repeats: int) -> list[tuple[str, float, float, str]]:
    images = complexity_images(device, dtype)
    naive = naive_complexity(images.double().cpu().numpy(), 16, 1.0, 32)
    exact = np.abs(complexity_map(images.double(), 16, sigma=1.0, bins=32).cpu().numpy() - naive).max()
    fast = complexity_map(images, 16, sigma=1.0, bins=32).double().cpu().numpy()
    # in float32 a few blurred pixels fall on the other side of a level boundary
    check = f"max |d| {exact:.1e} (float64), {np.abs(fast - naive).max():.1e} ({str(dtype)[6:]})"
    fast_t = _time(lambda: complexity_map(images, 16, sigma=1.0, bins=32), repeats, device)
    naive_t = _time(lambda: naive_complexity(images.double().cpu().numpy(), 16, 1.0, 32), 1, device)
    return [("complexity_map (16 x 512x512, patch 16)", fast_t, naive_t, check)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the vectorised code (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = bench_spaf(device, dtype, args.repeats) + bench_dpce(device, dtype, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; dtype: {args.dtype}; torch {torch.__version__}")
    print(f"| {'what':<62} | {'focusdpo':>11} | {'naive':>10} | {'speed-up':>8} | agreement")
    print(f"|{'-' * 64}|{'-' * 13}|{'-' * 12}|{'-' * 10}|{'-' * 40}")
    for what, fast_t, naive_t, check in rows:
        print(f"| {what:<62} | {fast_t * 1e3:8.2f} ms | {naive_t:8.3f} s | {naive_t / fast_t:7.0f}x | {check}")


if __name__ == "__main__":
    main()
