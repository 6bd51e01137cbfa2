"""Read and validate a sweep directory (metrics, runs table, config) against the data contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.errors import ResultsError

METRIC_COLUMNS = (
    "sweep", "algorithm", "seed", "step", "val_acc", "reward_mean", "reward_std", "kl", "entropy",
    "grad_norm", "clip_frac", "response_len", "loss", "time_rollout_s", "time_update_s", "time_other_s",
    "peak_mem_mib",
)
FLOAT_METRICS = METRIC_COLUMNS[4:]
RUN_COLUMNS = ("sweep", "algorithm", "seed", "status", "steps_done", "diverged_step", "wall_s", "mlflow_run_id")
RUN_STATUSES = ("finished", "diverged", "failed")
# Status given to runs when runs.csv is absent and the table is rebuilt from metrics alone.
UNKNOWN_STATUS = "unknown"

OVERHEAD_RESULT_KEYS = ("median_s", "min_s", "max_s", "peak_mib")


def load_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Return ``(metrics, runs, config)`` for ``results/<sweep>/``, or raise ResultsError.

    ``runs`` comes from runs.csv, or is derived from metrics (status ``"unknown"``) when that
    file is absent. ``config`` is ``{}`` when config.yaml is absent. Extra metric columns are dropped.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise ResultsError(f"sweep directory not found: {sweep_dir}")
    if not sweep_dir.is_dir():
        raise ResultsError(f"not a directory: {sweep_dir}")
    if not any(sweep_dir.iterdir()):
        raise ResultsError(f"sweep directory is empty: {sweep_dir}")
    metrics = _read_metrics(sweep_dir)
    runs = _read_runs(sweep_dir, metrics)
    config = _read_config(sweep_dir / "config.yaml")
    return metrics, runs, config


def _read_metrics(sweep_dir: Path) -> pd.DataFrame:
    parquet, csv = sweep_dir / "metrics.parquet", sweep_dir / "metrics.csv"
    # Parquet is the primary copy; a corrupt one is reported rather than silently replaced by the CSV.
    if parquet.exists():
        source = parquet
        try:
            df = pd.read_parquet(parquet)
        except Exception as exc:
            raise ResultsError(f"cannot read {parquet}: {type(exc).__name__}: {exc}") from exc
    elif csv.exists():
        source = csv
        df = _read_csv(csv)
    else:
        raise ResultsError(f"no metrics.parquet or metrics.csv in {sweep_dir}")
    if df.empty:
        raise ResultsError(f"metrics table is empty: {source}")
    _require_columns(df, METRIC_COLUMNS, source)
    df = df.loc[:, list(METRIC_COLUMNS)].copy()
    df["sweep"] = df["sweep"].astype(str)
    df["algorithm"] = df["algorithm"].astype(str)
    for col in ("seed", "step"):
        df[col] = _as_int(df[col], col, source)
    for col in FLOAT_METRICS:
        df[col] = _as_float(df[col], col, source)
    acc = df["val_acc"].dropna()
    if ((acc < 0) | (acc > 1)).any():
        raise ResultsError(f"val_acc outside [0, 1] in {source} (min {acc.min():g}, max {acc.max():g})")
    if acc.empty:
        raise ResultsError(f"no validation accuracy in {source}: every val_acc is NaN")
    dup = df.duplicated(["algorithm", "seed", "step"])
    if dup.any():
        first = df.loc[dup, ["algorithm", "seed", "step"]].iloc[0].tolist()
        raise ResultsError(f"{int(dup.sum())} duplicate (algorithm, seed, step) rows in {source}, e.g. {first}")
    return df.sort_values(["algorithm", "seed", "step"], kind="stable").reset_index(drop=True)


def _read_runs(sweep_dir: Path, metrics: pd.DataFrame) -> pd.DataFrame:
    path = sweep_dir / "runs.csv"
    if not path.exists():
        return derive_runs(metrics)
    runs = _read_csv(path)
    if runs.empty:
        raise ResultsError(f"runs table is empty: {path}")
    _require_columns(runs, RUN_COLUMNS, path)
    runs = runs.loc[:, list(RUN_COLUMNS)].copy()
    runs["sweep"] = runs["sweep"].astype(str)
    runs["algorithm"] = runs["algorithm"].astype(str)
    runs["seed"] = _as_int(runs["seed"], "seed", path)
    runs["status"] = runs["status"].astype(str).str.strip()
    bad = sorted(set(runs["status"]) - set(RUN_STATUSES))
    if bad:
        raise ResultsError(f"unknown status {bad} in {path}; expected one of {list(RUN_STATUSES)}")
    for col in ("steps_done", "diverged_step", "wall_s"):
        runs[col] = _as_float(runs[col], col, path)
    runs["mlflow_run_id"] = runs["mlflow_run_id"].fillna("").astype(str)
    if runs.duplicated(["algorithm", "seed"]).any():
        raise ResultsError(f"duplicate (algorithm, seed) rows in {path}")
    listed = set(zip(runs["algorithm"], runs["seed"]))
    missing = sorted(set(zip(metrics["algorithm"], metrics["seed"])) - listed)
    if missing:
        raise ResultsError(f"runs with metrics but no row in {path}: {missing[:5]}")
    return runs.sort_values(["algorithm", "seed"], kind="stable").reset_index(drop=True)


def derive_runs(metrics: pd.DataFrame) -> pd.DataFrame:
    """A runs table rebuilt from metrics; status is unknown because divergence is not recorded there."""
    g = metrics.groupby(["algorithm", "seed"], sort=True)
    runs = g.agg(sweep=("sweep", "first"), steps_done=("step", "max")).reset_index()
    runs["status"] = UNKNOWN_STATUS
    runs["steps_done"] = runs["steps_done"].astype(float)
    runs["diverged_step"] = np.nan
    runs["wall_s"] = np.nan
    runs["mlflow_run_id"] = ""
    return runs.loc[:, list(RUN_COLUMNS)]


def _read_config(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ResultsError(f"cannot parse {path}: {type(exc).__name__}") from exc
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ResultsError(f"{path} must hold a mapping, found {type(cfg).__name__}")
    return cfg


def config_facts(config: dict) -> dict[str, str]:
    """Key facts (task, model, steps, seeds) found anywhere in a sweep config, formatted for a header."""
    aliases = {
        "task": ("task", "task_name"),
        "model": ("model", "model_name", "model_id"),
        "steps": ("steps", "total_steps", "max_steps", "num_steps"),
        "seeds": ("seeds", "seed"),
    }
    facts = {}
    for fact, names in aliases.items():
        found = _find_key(config, names)
        if fact == "model" and isinstance(found, dict):
            found = _describe_model(found)
        if found is not None:
            facts[fact] = _format_fact(found)
    return facts


def _describe_model(model: dict) -> str:
    """The trainer's model block in words: a preset with its shape, a local path, or the packaged SmolLM2."""
    source = model.get("source")
    if source == "preset":
        return f"{model.get('preset')} preset (hidden {model.get('hidden_size')}, {model.get('num_layers')} layers)"
    if source == "smollm2":
        return "SmolLM2-135M-Instruct (GGUF)"
    named = model.get("path") or model.get("name") or model.get("model_name") or model.get("model_id")
    return str(named or source)


def _find_key(node: Any, names: tuple[str, ...]) -> Any:
    # Breadth-first so a top-level "steps" wins over one nested in, say, a scheduler block.
    queue = [node]
    while queue:
        current = queue.pop(0)
        if isinstance(current, dict):
            for name in names:
                if name in current and current[name] is not None:
                    return current[name]
            queue.extend(v for v in current.values() if isinstance(v, dict))
    return None


def _format_fact(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("name", "id", "model_id", "path"):
            if key in value:
                return str(value[key])
        text = json.dumps(value, sort_keys=True, default=str)
        return text if len(text) <= 120 else text[:117] + "..."
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def load_overhead(overhead_dir: str | Path) -> list[dict]:
    """Parse every ``*.json`` from ``bench overhead`` in a directory; each dict gains a ``source`` key."""
    overhead_dir = Path(overhead_dir)
    if not overhead_dir.is_dir():
        raise ResultsError(f"overhead directory not found: {overhead_dir}")
    out = []
    for path in sorted(overhead_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ResultsError(f"cannot parse overhead file {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise ResultsError(f"overhead file {path} must hold a JSON object")
        missing = [k for k in ("device", "date", "results") if k not in doc]
        if missing:
            raise ResultsError(f"overhead file {path} lacks keys {missing}")
        results = doc["results"]
        if not isinstance(results, dict) or not results:
            raise ResultsError(f"overhead file {path} has no results")
        _check_overhead_results(path, results, "")
        points = doc.get("points")
        if points is not None:
            if not isinstance(points, list):
                raise ResultsError(f"overhead file {path}: 'points' must be a list")
            for i, point in enumerate(points):
                where = f", point {i}"
                if not isinstance(point, dict) or any(k not in point for k in ("batch", "seq_len", "results")):
                    raise ResultsError(f"overhead file {path}{where} needs batch, seq_len and results")
                if not isinstance(point["results"], dict) or not point["results"]:
                    raise ResultsError(f"overhead file {path}{where} has no results")
                _check_overhead_results(path, point["results"], where)
        out.append({**doc, "source": path.name})
    return out


def _check_overhead_results(path: Path, results: dict, where: str) -> None:
    for mode, res in results.items():
        absent = [k for k in OVERHEAD_RESULT_KEYS if not isinstance(res, dict) or k not in res]
        if absent:
            raise ResultsError(f"overhead file {path}{where}, mode {mode!r} lacks keys {absent}")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError as exc:
        raise ResultsError(f"file is empty: {path}") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ResultsError(f"cannot parse {path}: {type(exc).__name__}") from exc


def _require_columns(df: pd.DataFrame, required: tuple[str, ...], source: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ResultsError(f"{source} lacks required columns {missing}")


def _as_float(col: pd.Series, name: str, source: Path) -> pd.Series:
    out = pd.to_numeric(col, errors="coerce").astype(float)
    bad = out.isna() & col.notna()
    if bad.any():
        raise ResultsError(f"non-numeric {name} in {source}, e.g. {col[bad].iloc[0]!r}")
    return out


def _as_int(col: pd.Series, name: str, source: Path) -> pd.Series:
    out = _as_float(col, name, source)
    if out.isna().any() or (out != np.round(out)).any():
        raise ResultsError(f"{name} must be whole numbers without gaps in {source}")
    return out.astype(np.int64)
