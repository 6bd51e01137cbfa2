"""Algorithms × seeds on one task, resumable, each run tracked in MLflow and saved as tidy tables.

    results/<sweep>/config.yaml                 the resolved configuration
    results/<sweep>/runs/<algo>__seed<s>/       one folder per run:
        attempt.json   written when a run starts (its MLflow run id)
        metrics.parquet, then result.json       written atomically when it ends; result.json marks it done
    results/<sweep>/metrics.parquet|csv, runs.csv   every finished run, gathered

Re-running the same command skips runs with a result.json, redoes the others (deleting the MLflow run of an
interrupted attempt), and gathers again: every run appears exactly once.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from tqdm import tqdm

from algorithms import ALGORITHMS
from analysis.atomic import atomic_write, atomic_write_text
from tasks import get_task

from .config import BenchConfig, ConfigError, to_yaml
from .trainer import METRIC_COLUMNS, RunResult, resolve_algorithm, train_run


@dataclass
class RunSpec:
    algorithm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.algorithm}__seed{self.seed}"


class SweepFailed(RuntimeError):
    pass


def atomic_to_parquet(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def sweep_dir(cfg: BenchConfig) -> Path:
    return Path(cfg.sweep.out_dir) / cfg.sweep.name


def tracking_uri(cfg: BenchConfig) -> str:
    if cfg.sweep.tracking_uri:
        return cfg.sweep.tracking_uri
    # A SQLite file: MLflow's recommended local store (its plain-folder store is frozen).
    return f"sqlite:///{(Path(cfg.sweep.out_dir).resolve() / 'mlflow.db')}"


def check_names(cfg: BenchConfig) -> None:
    """Unknown algorithms or tasks fail before any work starts, listing the valid names."""
    for name in cfg.sweep.algorithms:
        ALGORITHMS.get(name)
    # Bad task options or malformed data rows fail here, once, with the file and line.
    task = get_task(cfg.run.task, **cfg.run.task_options)
    task.train()
    task.test()
    for name in cfg.sweep.algorithm_overrides:
        if name not in cfg.sweep.algorithms:
            raise ConfigError(f"sweep.algorithm_overrides names {name!r}, which is not in sweep.algorithms")
    model = cfg.run.model
    if model.source == "path":
        target = Path(model.path) / model.gguf_file if model.gguf_file else Path(model.path)
        if not target.exists():
            raise ConfigError(f"run.model.path does not exist: {target}")
    for name in cfg.sweep.algorithms:
        try:
            resolve_algorithm(name, cfg.run, cfg.sweep.algorithm_overrides.get(name))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algorithm {name}: {e}") from None


def prepare(cfg: BenchConfig) -> Path:
    check_names(cfg)
    out = sweep_dir(cfg)
    saved = out / "config.yaml"
    current = OmegaConf.to_container(OmegaConf.structured(cfg.run))
    if saved.is_file():
        previous = OmegaConf.to_container(OmegaConf.load(saved)).get("run")
        if previous != current:
            raise ConfigError(
                f"{out} holds a sweep with a different run config; pick another sweep.name or remove that folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, to_yaml(cfg))
    return out


def run_one(cfg: BenchConfig, spec: RunSpec) -> dict:
    """Runs in a worker process: one training run, tracked in MLflow, saved atomically."""
    import mlflow
    from mlflow.entities import Metric

    out = sweep_dir(cfg) / "runs" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.sweep.name)
    attempt = out / "attempt.json"
    if attempt.is_file():  # an interrupted attempt: its MLflow run must not stay as a duplicate
        old = json.loads(attempt.read_text()).get("mlflow_run_id")
        if old:
            try:
                mlflow.delete_run(old)
            except Exception:  # already gone
                pass
    per_algorithm = cfg.sweep.algorithm_overrides.get(spec.algorithm)
    algo = resolve_algorithm(spec.algorithm, cfg.run, per_algorithm)
    with mlflow.start_run(run_name=spec.name) as active:
        run_id = active.info.run_id
        atomic_write_text(attempt, json.dumps({"mlflow_run_id": run_id}))
        mlflow.set_tags({"sweep": cfg.sweep.name, "algorithm": spec.algorithm, "seed": str(spec.seed),
                         "task": cfg.run.task})
        mlflow.log_params(_flatten({"run": OmegaConf.to_container(OmegaConf.structured(cfg.run)),
                                    "algorithm": OmegaConf.to_container(OmegaConf.structured(algo)),
                                    "seed": spec.seed}))

        pending: list = []

        def log_row(row: dict) -> None:
            # Batched, so that parallel runs seldom contend for the SQLite store's write lock.
            step = int(row["step"])
            pending.extend(Metric(k, float(v), int(time.time() * 1000), step)
                           for k, v in row.items() if k != "step" and v == v)  # NaN: not evaluated
            if len(pending) >= 200:
                _flush(run_id, pending)

        result: RunResult = train_run(cfg.run, spec.algorithm, spec.seed, Path(cfg.sweep.out_dir) / "cache",
                                      per_algorithm, on_row=log_row, progress=cfg.sweep.workers == 1)
        _flush(run_id, pending)
        frame = run_frame(cfg, spec, result)
        atomic_to_parquet(frame, out / "metrics.parquet")
        mlflow.log_text(frame.to_csv(index=False), "metrics.csv")
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.set_tag("status", result.status)
        summary = {
            "sweep": cfg.sweep.name, "algorithm": spec.algorithm, "seed": spec.seed, "status": result.status,
            "steps_done": int(frame["step"].max()), "diverged_step": result.diverged_step,
            "wall_s": result.wall_s, "mlflow_run_id": run_id,
        }
        atomic_write_text(out / "result.json", json.dumps(summary))
    attempt.unlink(missing_ok=True)
    return summary


def _flush(run_id: str, pending: list) -> None:
    from mlflow.tracking import MlflowClient

    if pending:
        MlflowClient().log_batch(run_id, metrics=list(pending))
        pending.clear()


def init_tracking(cfg: BenchConfig) -> None:
    """Create the store and the experiment once, before parallel workers would race to."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    if cfg.sweep.tracking_uri is None and mlflow.get_experiment_by_name(cfg.sweep.name) is None:
        # Artifacts beside the store, not in an ./mlruns of whatever folder the command ran from.
        artifacts = (Path(cfg.sweep.out_dir).resolve() / "mlartifacts").as_uri()
        mlflow.create_experiment(cfg.sweep.name, artifact_location=artifacts)
    mlflow.set_experiment(cfg.sweep.name)


def run_frame(cfg: BenchConfig, spec: RunSpec, result: RunResult) -> pd.DataFrame:
    frame = pd.DataFrame(result.rows)
    frame.insert(0, "step", frame.pop("step").astype(int))
    frame.insert(0, "seed", spec.seed)
    frame.insert(0, "algorithm", spec.algorithm)
    frame.insert(0, "sweep", cfg.sweep.name)
    return frame[["sweep", "algorithm", "seed", "step", *METRIC_COLUMNS]]


def _flatten(tree, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def _run_safely(cfg: BenchConfig, spec: RunSpec) -> tuple[RunSpec, dict | None, str | None]:
    try:
        return spec, run_one(cfg, spec), None
    except Exception as e:  # a crash of one run must not stop the sweep; it is retried on the next call
        detail = traceback.format_exc()
        out = sweep_dir(cfg) / "runs" / spec.name
        atomic_write_text(out / "error.txt", detail)
        return spec, None, f"{type(e).__name__}: {e}"


def run_sweep(cfg: BenchConfig) -> Path:
    out = prepare(cfg)
    specs = [RunSpec(a, s) for s in cfg.sweep.seeds for a in cfg.sweep.algorithms]
    todo = [s for s in specs if not (out / "runs" / s.name / "result.json").is_file()]
    skipped = len(specs) - len(todo)
    if skipped:
        print(f"resuming {cfg.sweep.name}: {skipped} finished run(s) kept, {len(todo)} to run")
    # The warm start is shared by every run: compute it once before the workers start.
    if todo:
        init_tracking(cfg)
        _warm_cache(cfg)
    errors = []
    bar = tqdm(total=len(todo), desc=f"sweep {cfg.sweep.name}", unit="run", disable=None)
    if cfg.sweep.workers == 1 or len(todo) <= 1:
        for spec in todo:
            _, _, err = _run_safely(cfg, spec)
            if err:
                errors.append(f"{spec.name}: {err}")
            bar.update()
    else:
        # Each worker gets run.threads threads, so workers × threads should not exceed the cores.
        os.environ["OMP_NUM_THREADS"] = str(cfg.run.threads)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.sweep.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_run_safely, cfg, spec) for spec in todo]
            for fut in as_completed(futures):
                spec, _, err = fut.result()
                if err:
                    errors.append(f"{spec.name}: {err}")
                bar.update()
    bar.close()
    gather(cfg)
    if errors:
        raise SweepFailed(
            f"{len(errors)} run(s) failed (details in runs/<name>/error.txt; re-run to retry): " + "; ".join(errors)
        )
    return out


def _warm_cache(cfg: BenchConfig) -> None:
    if cfg.run.model.warmstart_steps <= 0:
        return
    import torch

    from .policy import initial_policy, load_policy_tokenizer

    torch.set_num_threads(max(1, cfg.run.threads * cfg.sweep.workers))
    task = get_task(cfg.run.task, **cfg.run.task_options)
    tokenizer = load_policy_tokenizer(cfg.run.model, task)
    initial_policy(cfg.run.model, task, tokenizer, Path(cfg.sweep.out_dir) / "cache", cfg.run.device)


def gather(cfg: BenchConfig) -> pd.DataFrame:
    """Every finished run's metrics into one tidy table (parquet and CSV) and the runs table."""
    out = sweep_dir(cfg)
    frames, runs = [], []
    for spec in (RunSpec(a, s) for s in cfg.sweep.seeds for a in cfg.sweep.algorithms):
        folder = out / "runs" / spec.name
        if (folder / "result.json").is_file():
            frames.append(pd.read_parquet(folder / "metrics.parquet"))
            runs.append(json.loads((folder / "result.json").read_text()))
    if not frames:
        return pd.DataFrame()
    metrics = pd.concat(frames, ignore_index=True)
    atomic_to_parquet(metrics, out / "metrics.parquet")
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    atomic_write_text(out / "runs.csv", pd.DataFrame(runs).to_csv(index=False))
    return metrics
