"""Statistics of paired evaluations: bootstrap intervals over evaluation units and training seeds, and the
smallest difference an evaluation can detect.

Every method is scored on the same evaluation *units* (toy benchmark: subject count x scene x sampling seed x
sample, see :mod:`focusdpo.eval.toy`), so scores are arrays ``float [S, U]``: S training seeds (1 for the base,
which has none) x U units, NaN where a unit has no value (e.g. leakage of a scene whose subjects were not
found). A method's value is ``mean_s nanmean_u scores[s, u]``.

Paired bootstrap (:func:`bootstrap_intervals`): each replicate draws the U units with replacement *and* the S
training seeds with replacement, and recomputes every method's value on the drawn units and seeds. All methods
of a replicate use the same draw, so the replicate of a difference ``a - b`` is the difference of the replicates
(paired: the noise of the shared scenes and sampling noise cancels). The interval is the percentile interval of
the replicates (default 95 %: the 2.5 and 97.5 percentiles). A method with one seed row (the base) is paired
with every drawn seed of the other.

Units of one scene under different sampling seeds are resampled as independent units: measured on the shipped
base (32 scenes x 2 subject counts x 2 sampling seeds, DPO runs minus base), resampling scenes as clusters
instead gives standard errors within 8 % of this.

Detectable effect (:func:`detectable_effect`): a two-sided test at level ``alpha`` detects a true difference
``delta`` with probability ``power`` when ``delta >= (z_{1 - alpha/2} + z_{power}) * SE``, which is
``2.80 * SE`` at alpha 0.05 and power 0.8. :func:`unit_se` gives the SE of a paired mean difference from the
per-unit variance: ``SE = sd_u(dbar_u) / sqrt(U)`` with ``dbar_u`` the per-unit difference averaged over
training seeds (the evaluation sample's share of the error; training-seed spread comes on top, the bootstrap
includes both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

DEFAULT_REPLICATES = 2000
DEFAULT_LEVEL = 0.95
ZERO_TOL = 1e-9  # differences of equal per-unit scores are 0 up to float rounding of the means


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval: ``mean`` (the value on the full sample), ``lo``/``hi``
    (percentile interval), ``se`` (std of the replicates)."""

    mean: float
    lo: float
    hi: float
    se: float

    @property
    def excludes_zero(self) -> bool:
        """True when 0 lies outside ``[lo, hi]`` (the difference is detected), beyond float rounding (1e-9)."""
        return bool(self.lo > ZERO_TOL or self.hi < -ZERO_TOL)

    def as_dict(self) -> dict[str, float | list[float | None] | None]:
        """``{"ci": [lo, hi], "se_boot": se}``; NaN (no finite replicate) as None, which JSON keeps."""
        return {"ci": [finite_or_none(self.lo), finite_or_none(self.hi)], "se_boot": finite_or_none(self.se)}


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or None when it is NaN or infinite (JSON has no NaN)."""
    return float(x) if math.isfinite(x) else None


def run_values(scores: np.ndarray, unit_weights: np.ndarray | None = None) -> np.ndarray:
    """NaN-skipping mean over units of each seed row.

    scores: ``float [S, U]``; unit_weights: ``[B, U]`` counts of each unit in B resamples (None: each unit once).
    Returns ``float [B, S]`` (``[1, S]`` without weights); NaN where no drawn unit has a value.
    """
    valid = ~np.isnan(scores)
    w = np.ones((1, scores.shape[1])) if unit_weights is None else np.asarray(unit_weights, dtype=float)
    num = w @ np.where(valid, scores, 0.0).T
    den = w @ valid.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _seed_mean(runs: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
    """``[B, S]`` run values weighted by ``[B, S]`` seed counts -> ``[B]`` NaN-skipping means over seeds."""
    valid = ~np.isnan(runs)
    w = seed_weights * valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(valid, runs, 0.0) * w).sum(1) / w.sum(1)


def method_value(scores: np.ndarray) -> float:
    """``mean_s nanmean_u scores[s, u]`` of ``float [S, U]`` scores (NaN-skipping at both levels)."""
    runs = run_values(np.atleast_2d(np.asarray(scores, dtype=float)))
    return float(_seed_mean(runs, np.ones_like(runs))[0])


def resample_counts(n: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``replicates`` draws of ``n`` with replacement:
    ``int [replicates, n]``, every row summing to ``n``."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates)


def _as_rows(name: str, scores: np.ndarray, n_seeds: int, n_units: int) -> np.ndarray:
    x = np.atleast_2d(np.asarray(scores, dtype=float))
    if x.ndim != 2 or x.shape[1] != n_units or x.shape[0] not in (1, n_seeds):
        raise ValueError(f"scores of {name!r} have shape {x.shape}: expected [S, U] with U={n_units} units "
                         f"(the same units for every method) and S=1 or S={n_seeds} training seeds")
    return x


def bootstrap_intervals(scores: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]] = (),
                        replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = DEFAULT_LEVEL
                        ) -> dict[str | tuple[str, str], Interval]:
    """Paired bootstrap intervals of every method and of every difference ``a - b`` in ``pairs``.

    scores: method -> ``float [S, U]`` (or ``[U]``: one seed row); the same U units in the same order for all,
        S equal for every multi-seed method; NaN = no value.
    pairs: ``(a, b)`` names of ``scores``; the result's key for a pair is the tuple itself.
    replicates, seed: number of bootstrap draws and the seed of the draws (fixed: reruns give the same interval).
    level: interval coverage in (0, 1).
    Returns ``{name or (a, b): Interval}`` (see the module docstring for the draw).
    """
    if not scores:
        raise ValueError("bootstrap_intervals: scores is empty")
    if replicates < 2 or not 0 < level < 1:
        raise ValueError(f"bootstrap: replicates={replicates} (allowed >= 2), level={level} (allowed in (0, 1))")
    shapes = {k: np.atleast_2d(np.asarray(v)).shape for k, v in scores.items()}
    n_units = next(iter(shapes.values()))[-1]
    n_seeds = max(s[0] for s in shapes.values())
    rows = {k: _as_rows(k, v, n_seeds, n_units) for k, v in scores.items()}
    rng = np.random.default_rng(seed)
    unit_w = resample_counts(n_units, replicates, rng)
    seed_w = resample_counts(n_seeds, replicates, rng).astype(float)
    reps = {k: _seed_mean(run_values(x, unit_w), seed_w if x.shape[0] == n_seeds else np.ones((replicates, 1)))
            for k, x in rows.items()}
    point = {k: method_value(x) for k, x in rows.items()}
    out: dict[str | tuple[str, str], Interval] = {k: _interval(point[k], reps[k], level) for k in rows}
    for a, b in pairs:
        out[(a, b)] = _interval(point[a] - point[b], reps[a] - reps[b], level)
    return out


def _interval(point: float, reps: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2 * 100
    finite = reps[np.isfinite(reps)]
    if finite.size == 0:
        return Interval(point, float("nan"), float("nan"), float("nan"))
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return Interval(point, float(lo), float(hi), float(np.std(finite, ddof=1)))


def z_factor(alpha: float = 0.05, power: float = 0.8) -> float:
    """``z_{1 - alpha/2} + z_{power}``: 1.960 + 0.842 = 2.802 at the defaults."""
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha={alpha} and power={power} must lie in (0, 1)")
    z = NormalDist().inv_cdf
    return z(1 - alpha / 2) + z(power)


def detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable difference ``(z_{1 - alpha/2} + z_{power}) * se`` (``2.80 * se`` at the defaults):
    the smallest true difference that a two-sided level-``alpha`` test sees with probability ``power``."""
    return z_factor(alpha, power) * se


def unit_se(diff: np.ndarray) -> tuple[float, int]:
    """SE of a paired mean difference from its per-unit variance, and the number of units it used.

    diff: ``float [S, U]`` (or ``[U]``) per-seed, per-unit differences ``a - b`` (NaN where either is missing).
    Each unit's differences are averaged over seeds (``dbar_u``); ``SE = std(dbar_u, ddof=1) / sqrt(U')`` over
    the U' units with a value. Returns ``(nan, U')`` when ``U' < 2``.
    """
    x = np.atleast_2d(np.asarray(diff, dtype=float))
    valid = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_unit = np.where(valid, x, 0.0).sum(0) / valid.sum(0)
    d = per_unit[np.isfinite(per_unit)]
    if d.size < 2:
        return float("nan"), int(d.size)
    return float(np.std(d, ddof=1) / math.sqrt(d.size)), int(d.size)


def units_needed(unit_sd: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units needed so that :func:`detectable_effect` reaches ``effect`` for a per-unit SD ``unit_sd``:
    ``ceil((z * unit_sd / effect)^2)``."""
    if effect <= 0:
        raise ValueError(f"effect={effect} must be > 0")
    return math.ceil((z_factor(alpha, power) * unit_sd / effect) ** 2)


def paired_summary(scores: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]],
                   replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = DEFAULT_LEVEL,
                   alpha: float = 0.05, power: float = 0.8) -> dict[str, dict]:
    """Intervals of every method and every paired difference of one metric, as JSON-ready dicts.

    scores, pairs, replicates, seed, level: as :func:`bootstrap_intervals`.
    Returns ``{method: {"ci": [lo, hi], "se_boot", "vs_<b>": {...}}}`` where ``vs_<b>`` (for each pair
    ``(method, b)``) holds ``mean`` (difference of the method values), ``ci``, ``se_boot``, ``excludes_zero``,
    ``se_unit`` and ``n_units`` (:func:`unit_se` of the per-unit differences) and ``mde``
    (:func:`detectable_effect` of ``se_unit`` at ``alpha`` and ``power``).
    """
    iv = bootstrap_intervals(scores, pairs, replicates, seed, level)
    out: dict[str, dict] = {m: iv[m].as_dict() for m in scores}
    for a, b in pairs:
        diff = np.atleast_2d(np.asarray(scores[a], dtype=float)) - np.atleast_2d(np.asarray(scores[b], dtype=float))
        se, n = unit_se(diff)
        d = iv[(a, b)]
        out[a][f"vs_{b}"] = {"mean": finite_or_none(d.mean), **d.as_dict(), "excludes_zero": d.excludes_zero,
                             "se_unit": finite_or_none(se), "n_units": n,
                             "mde": finite_or_none(detectable_effect(se, alpha, power))}
    return out
