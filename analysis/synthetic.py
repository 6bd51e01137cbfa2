"""Synthetic sweeps that follow the data contract, with planted effects, for tests and dry runs.

The accuracy of (algorithm, seed) rises linearly from a per-seed starting point to
``start + gains[algorithm] + seed effect`` plus noise; the seed effect is shared by all algorithms
because a seed fixes prompts and initial weights, which is what makes the sweep paired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.atomic import atomic_write, atomic_write_text
from analysis.load import RUN_COLUMNS


def synthetic_metrics(
    gains: Mapping[str, float],
    seeds: Sequence[int] = tuple(range(8)),
    steps: int = 20,
    eval_every: int = 5,
    start: float = 0.3,
    seed_sd: float = 0.05,
    noise_sd: float = 0.02,
    sweep: str = "synthetic",
    rng: np.random.Generator | int | None = 0,
) -> pd.DataFrame:
    """Tidy per-step metrics, one row per (algorithm, seed, step), with the contract's columns."""
    rng = np.random.default_rng(rng)
    seed_effect = {s: rng.normal(0.0, seed_sd) for s in seeds}
    rows = []
    for alg, gain in gains.items():
        for s in seeds:
            for step in range(steps + 1):
                frac = step / steps
                evaluated = step % eval_every == 0 or step == steps
                acc = start + seed_effect[s] + gain * frac + rng.normal(0.0, noise_sd)
                update = step > 0
                rows.append({
                    "sweep": sweep, "algorithm": alg, "seed": s, "step": step,
                    "val_acc": float(np.clip(acc, 0.0, 1.0)) if evaluated else np.nan,
                    "reward_mean": float(np.clip(acc + rng.normal(0, 0.03), 0, 1)) if update else np.nan,
                    "reward_std": 0.4 if update else np.nan,
                    "kl": float(np.exp(rng.normal(-6, 0.5))) if update else np.nan,
                    "entropy": 1.5 * (1 - 0.5 * frac) if update else np.nan,
                    "grad_norm": float(np.exp(rng.normal(0, 0.2))) if update else np.nan,
                    "clip_frac": 0.1 if update else np.nan,
                    "response_len": 120.0 - 40 * frac if update else np.nan,
                    "loss": float(rng.normal(0, 0.1)) if update else np.nan,
                    "time_rollout_s": 1.0 if update else np.nan,
                    "time_update_s": 0.5 if update else np.nan,
                    "time_other_s": 0.1 if update else np.nan,
                    "peak_mem_mib": 2048.0 if update else np.nan,
                })
    return pd.DataFrame(rows)


def runs_from_metrics(metrics: pd.DataFrame, statuses: Mapping[tuple[str, int], str] | None = None) -> pd.DataFrame:
    """A runs.csv table for ``metrics``; ``statuses`` overrides "finished" for chosen (algorithm, seed)."""
    statuses = statuses or {}
    rows = []
    for (alg, s), g in metrics.groupby(["algorithm", "seed"], sort=True):
        status = statuses.get((alg, s), "finished")
        last = int(g["step"].max())
        rows.append({"sweep": g["sweep"].iloc[0], "algorithm": alg, "seed": s, "status": status,
                     "steps_done": last, "diverged_step": float(last) if status == "diverged" else np.nan,
                     "wall_s": float(g[["time_rollout_s", "time_update_s", "time_other_s"]].sum().sum()),
                     "mlflow_run_id": f"run-{alg}-{s}"})
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def write_sweep(
    sweep_dir: str | Path,
    metrics: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    config: dict | None = None,
) -> Path:
    """Write metrics.parquet, metrics.csv and, when given, runs.csv and config.yaml."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep_dir / "metrics.parquet", lambda tmp: metrics.to_parquet(tmp, index=False))
    atomic_write_text(sweep_dir / "metrics.csv", metrics.to_csv(index=False))
    if runs is not None:
        atomic_write_text(sweep_dir / "runs.csv", runs.to_csv(index=False))
    if config is not None:
        atomic_write_text(sweep_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return sweep_dir
