"""Accuracy statistics: per-run summaries, per-algorithm aggregates, bootstrap CIs and paired tests; and
a distribution-free CI for a median (the overhead benchmark's per-round ratios).

Pure functions over arrays and DataFrames; nothing here reads files or draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.palette import order_algorithms

ACC_METRICS = ("final", "best", "auc", "gain")
BASELINES = ("reinforce", "grpo")


def curve_summary(steps: Sequence[float], acc: Sequence[float], last_k: int = 3) -> dict[str, float]:
    """Summaries of one validation curve; NaN accuracies (steps without a validation) are ignored.

    final = mean of the last ``last_k`` evaluations (fewer if the run has fewer), best = max,
    auc = trapezoid area over steps divided by the step span (an average accuracy),
    gain = final - accuracy at step 0 (NaN when step 0 was not evaluated).
    """
    steps = np.asarray(steps, dtype=float)
    acc = np.asarray(acc, dtype=float)
    keep = ~np.isnan(acc)
    steps, acc = steps[keep], acc[keep]
    order = np.argsort(steps, kind="stable")
    steps, acc = steps[order], acc[order]
    n = len(acc)
    if n == 0:
        return {"n_evals": 0, "acc0": np.nan, "final": np.nan, "best": np.nan, "auc": np.nan, "gain": np.nan}
    final = float(acc[-last_k:].mean())
    span = steps[-1] - steps[0]
    auc = float(np.trapezoid(acc, steps) / span) if span > 0 else float(acc.mean())
    acc0 = float(acc[0]) if steps[0] == 0 else np.nan
    return {"n_evals": n, "acc0": acc0, "final": final, "best": float(acc.max()), "auc": auc,
            "gain": final - acc0}


def run_accuracy(metrics: pd.DataFrame, runs: pd.DataFrame | None = None, last_k: int = 3) -> pd.DataFrame:
    """One row per (algorithm, seed) with n_evals, acc0, final, best, auc, gain (and status if runs given)."""
    rows = []
    for (alg, seed), g in metrics.groupby(["algorithm", "seed"], sort=True):
        rows.append({"algorithm": alg, "seed": seed, **curve_summary(g["step"], g["val_acc"], last_k)})
    out = pd.DataFrame(rows)
    if runs is not None:
        out = out.merge(runs[["algorithm", "seed", "status"]], on=["algorithm", "seed"], how="left")
    return out


def iqm(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle 50 % (scipy's trim_mean with 25 % cut each side)."""
    return sps.trim_mean(x, 0.25, axis=axis)


def stratified_bootstrap(
    values: Sequence[float],
    statistic: Callable[..., np.ndarray] = iqm,
    strata: Sequence | None = None,
    n_boot: int = 2000,
    rng: np.random.Generator | int | None = 0,
) -> np.ndarray:
    """``n_boot`` bootstrap replicates of ``statistic(sample, axis=1)``.

    Each replicate resamples with replacement *within* each stratum (e.g. the seeds of one task),
    keeping stratum sizes, then applies the statistic to the pooled resample, as rliable does.
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(rng)
    labels = np.zeros(len(values), dtype=int) if strata is None else pd.factorize(np.asarray(strata))[0]
    if len(labels) != len(values):
        raise ValueError("strata must have one label per value")
    columns = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        columns.append(idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))])
    index = np.concatenate(columns, axis=1)
    return np.asarray(statistic(values[index], axis=1), dtype=float)


def percentile_ci(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def median_ci(x: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``x``: two order statistics of the sample,
    chosen by the binomial distribution (``scipy.stats.quantile_test``), so it needs no resampling and no
    assumption about the spread. (nan, nan) when ``x`` is too short for the confidence asked (fewer than 6
    values at 95 %)."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.nan, np.nan
    ci = sps.quantile_test(x, q=float(np.median(x)), p=0.5).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def iqm_ci(
    x: Sequence[float],
    strata: Sequence | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float, float]:
    """IQM of ``x`` with a stratified percentile-bootstrap CI; NaNs if ``x`` is empty."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.nan, np.nan, np.nan
    reps = stratified_bootstrap(x, iqm, strata=strata, n_boot=n_boot, rng=rng)
    return float(iqm(x)), *percentile_ci(reps, confidence)


def summarize(
    per_run: pd.DataFrame,
    metrics: Sequence[str] = ACC_METRICS,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (algorithm, metric): n seeds, median, q25, q75 (numpy linear percentiles), IQM and its CI."""
    rng = np.random.default_rng(seed)
    rows = []
    for alg in order_algorithms(per_run["algorithm"]):
        sub = per_run[per_run["algorithm"] == alg]
        for metric in metrics:
            x = sub[metric].dropna().to_numpy(dtype=float)
            if x.size:
                q25, med, q75 = np.percentile(x, [25, 50, 75])
            else:
                q25 = med = q75 = np.nan
            value, lo, hi = iqm_ci(x, n_boot=n_boot, confidence=confidence, rng=rng)
            rows.append({"algorithm": alg, "metric": metric, "n": int(x.size), "median": med, "q25": q25,
                         "q75": q75, "iqm": value, "iqm_lo": lo, "iqm_hi": hi})
    return pd.DataFrame(rows)


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X > Y) + 0.5 P(X = Y) for X drawn from ``x`` and Y from ``y`` (all pairs)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return np.nan
    return float(_poi_batched(x[None, :], y[None, :])[0])


def _poi_batched(xb: np.ndarray, yb: np.ndarray) -> np.ndarray:
    gt = (xb[:, :, None] > yb[:, None, :]).mean(axis=(1, 2))
    eq = (xb[:, :, None] == yb[:, None, :]).mean(axis=(1, 2))
    return gt + 0.5 * eq


def poi_ci(
    x: Sequence[float],
    y: Sequence[float],
    n_boot: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float, float]:
    """Probability of improvement with a percentile-bootstrap CI (seeds resampled within each algorithm)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(rng)
    reps = np.empty(n_boot)
    chunk = max(1, 2_000_000 // (x.size * y.size))  # bounds the (chunk, n, m) comparison array
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        xb = x[rng.integers(0, x.size, size=(size, x.size))]
        yb = y[rng.integers(0, y.size, size=(size, y.size))]
        reps[start:start + size] = _poi_batched(xb, yb)
    return probability_of_improvement(x, y), *percentile_ci(reps, confidence)


def paired_test(x: pd.Series, y: pd.Series) -> dict:
    """Two-sided test of ``x`` vs ``y``, both indexed by seed.

    Same seeds on both sides -> Wilcoxon signed-rank on the per-seed differences (the sweep is paired:
    a seed fixes prompts and initial weights); otherwise Mann-Whitney U. When no p-value can be had
    the p-value is NaN and ``note`` says why.
    """
    x, y = x.dropna(), y.dropna()
    if len(x) and len(y) and set(x.index) == set(y.index):
        d = (x - y.reindex(x.index)).to_numpy(dtype=float)
        out = {"test": "wilcoxon", "n_pairs": len(d), "median_diff": float(np.median(d)),
               "statistic": np.nan, "p_value": np.nan, "note": ""}
        nonzero = int(np.count_nonzero(d))
        if len(d) < 2:
            out["note"] = f"only {len(d)} paired seed; need at least 2"
            return out
        if nonzero == 0:
            out["note"] = "all paired differences are zero"
            return out
        notes = []
        if nonzero < len(d):
            notes.append(f"{len(d) - nonzero} zero differences dropped")
        if 2.0 / 2**nonzero >= 0.05:
            notes.append(f"{nonzero} non-zero pairs cannot reach p<0.05")
        try:
            res = sps.wilcoxon(d)
        except ValueError as exc:
            notes.append(f"wilcoxon failed: {exc}")
        else:
            out["statistic"], out["p_value"] = float(res.statistic), float(res.pvalue)
        out["note"] = "; ".join(notes)
        return out
    out = {"test": "mannwhitneyu", "n_pairs": 0, "median_diff": np.nan, "statistic": np.nan,
           "p_value": np.nan, "note": "seeds differ; unpaired"}
    if len(x) == 0 or len(y) == 0:
        out["note"] = "a group has no runs"
        return out
    out["median_diff"] = float(np.median(x) - np.median(y))
    if np.unique(np.concatenate([x.to_numpy(float), y.to_numpy(float)])).size == 1:
        out["note"] = "seeds differ; all values identical"
        return out
    res = sps.mannwhitneyu(x.to_numpy(float), y.to_numpy(float), alternative="two-sided")
    out["statistic"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def compare(
    per_run: pd.DataFrame,
    baselines: Sequence[str] = BASELINES,
    metrics: Sequence[str] = ("final", "auc"),
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Each algorithm against each baseline present: probability of improvement (with CI) and a test."""
    rng = np.random.default_rng(seed)
    algorithms = order_algorithms(per_run["algorithm"])
    rows = []
    for metric in metrics:
        by_alg = {a: per_run[per_run["algorithm"] == a].set_index("seed")[metric].dropna() for a in algorithms}
        present = [b for b in baselines if b in by_alg]
        for i, base in enumerate(present):
            # An earlier baseline was already compared with this one (grpo vs reinforce, not also the reverse).
            for alg in (a for a in algorithms if a != base and a not in present[:i]):
                x, y = by_alg[alg], by_alg[base]
                p, lo, hi = poi_ci(x.to_numpy(), y.to_numpy(), n_boot=n_boot, confidence=confidence, rng=rng)
                rows.append({"metric": metric, "algorithm": alg, "baseline": base, "n_algorithm": len(x),
                             "n_baseline": len(y), "poi": p, "poi_lo": lo, "poi_hi": hi, **paired_test(x, y)})
    columns = ["metric", "algorithm", "baseline", "n_algorithm", "n_baseline", "poi", "poi_lo", "poi_hi",
               "test", "n_pairs", "median_diff", "statistic", "p_value", "note"]
    return pd.DataFrame(rows, columns=columns)
