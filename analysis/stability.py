"""Training-stability diagnostics: KL, gradient-norm spikes, entropy collapse, accuracy collapse."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.palette import order_algorithms

# Float noise must not decide whether a drop of exactly `margin` counts.
_EPS = 1e-12


def grad_spikes(grad_norm: Sequence[float], k: float = 5.0, min_history: int = 1) -> np.ndarray:
    """Boolean mask (per step, in step order) of gradient norms above ``k`` x the running median of
    the previous steps' norms. NaN steps (e.g. step 0) are never spikes and do not enter the median;
    a step needs ``min_history`` earlier norms before it can be a spike.
    """
    g = np.asarray(grad_norm, dtype=float)
    mask = np.zeros(g.shape, dtype=bool)
    history: list[float] = []
    for i, value in enumerate(g):
        if np.isnan(value):
            continue
        if len(history) >= min_history and value > k * np.median(history):
            mask[i] = True
        history.append(value)
    return mask


def accuracy_collapse(steps: Sequence[float], acc: Sequence[float], margin: float = 0.1) -> tuple[bool, float]:
    """``(collapsed, collapse_step)``: accuracy drops at least ``margin`` (absolute) below the run's own
    best and stays there through the last evaluation. ``collapse_step`` is the first evaluation of that
    final stretch (NaN if not collapsed). A dip that recovers is not a collapse.
    """
    steps = np.asarray(steps, dtype=float)
    acc = np.asarray(acc, dtype=float)
    keep = ~np.isnan(acc)
    steps, acc = steps[keep], acc[keep]
    if acc.size == 0:
        return False, np.nan
    order = np.argsort(steps, kind="stable")
    steps, acc = steps[order], acc[order]
    below = acc <= acc.max() - margin + _EPS
    if not below[-1]:
        return False, np.nan
    # The best evaluation itself is never below, so the final all-below stretch starts after it.
    start = int(np.flatnonzero(~below)[-1]) + 1
    return True, float(steps[start])


def entropy_collapse(entropy: Sequence[float], fraction: float = 0.1) -> tuple[float, float, bool]:
    """``(initial, final, collapsed)`` from the first and last non-NaN entropies (in step order);
    collapsed when final < ``fraction`` x initial."""
    e = np.asarray(entropy, dtype=float)
    e = e[~np.isnan(e)]
    if e.size == 0:
        return np.nan, np.nan, False
    return float(e[0]), float(e[-1]), bool(e[-1] < fraction * e[0])


def run_stability(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    k: float = 5.0,
    margin: float = 0.1,
    entropy_fraction: float = 0.1,
) -> pd.DataFrame:
    """One row per run in ``runs``. ``collapsed`` = accuracy collapse or a diverged status."""
    grouped = {key: g.sort_values("step") for key, g in metrics.groupby(["algorithm", "seed"], sort=False)}
    empty = metrics.iloc[0:0]
    order = {a: i for i, a in enumerate(order_algorithms(runs["algorithm"]))}
    runs = runs.sort_values(["algorithm", "seed"], key=lambda s: s.map(order) if s.name == "algorithm" else s)
    rows = []
    for run in runs.itertuples(index=False):
        g = grouped.get((run.algorithm, run.seed), empty)
        kl = g["kl"].to_numpy(dtype=float)
        e0, e1, e_collapsed = entropy_collapse(g["entropy"], entropy_fraction)
        acc_collapsed, collapse_step = accuracy_collapse(g["step"], g["val_acc"], margin)
        diverged = run.status == "diverged"
        rows.append({
            "algorithm": run.algorithm, "seed": run.seed, "status": run.status,
            "max_kl": float(np.nanmax(kl)) if np.isfinite(kl).any() else np.nan,
            "grad_spikes": int(grad_spikes(g["grad_norm"], k).sum()),
            "entropy_initial": e0, "entropy_final": e1, "entropy_collapsed": e_collapsed,
            "acc_collapsed": acc_collapsed, "collapse_step": collapse_step,
            "diverged": diverged, "collapsed": acc_collapsed or diverged,
        })
    return pd.DataFrame(rows)


def stability_summary(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per algorithm; fractions are over runs that did not fail for infrastructure reasons (n)."""
    rows = []
    for alg in order_algorithms(per_run["algorithm"]):
        sub = per_run[per_run["algorithm"] == alg]
        ok = sub[sub["status"] != "failed"]
        n = len(ok)

        def frac(col: str, ok: pd.DataFrame = ok, n: int = n) -> float:
            return float(ok[col].mean()) if n else np.nan

        rows.append({
            "algorithm": alg, "n": n, "n_failed": int(len(sub) - n),
            "frac_collapsed": frac("collapsed"), "frac_diverged": frac("diverged"),
            "frac_entropy_collapsed": frac("entropy_collapsed"),
            "median_max_kl": float(ok["max_kl"].median()) if n else np.nan,
            "median_grad_spikes": float(ok["grad_spikes"].median()) if n else np.nan,
        })
    return pd.DataFrame(rows)


def spread_over_time(metrics: pd.DataFrame, column: str = "val_acc") -> pd.DataFrame:
    """Per (algorithm, step) across seeds: n, median, q25, q75 and iqr of ``column`` (NaNs dropped)."""
    data = metrics[["algorithm", "step", column]].dropna()
    g = data.groupby(["algorithm", "step"], sort=True)[column]
    out = pd.DataFrame({
        "n": g.size(),
        "median": g.median(),
        "q25": g.quantile(0.25),
        "q75": g.quantile(0.75),
    }).reset_index()
    out["iqr"] = out["q75"] - out["q25"]
    order = {a: i for i, a in enumerate(order_algorithms(out["algorithm"]))}
    return out.sort_values(["algorithm", "step"], key=lambda s: s.map(order) if s.name == "algorithm" else s,
                           kind="stable").reset_index(drop=True)
