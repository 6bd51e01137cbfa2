"""The trainer and the sweep: determinism, resumption, divergence, and ISOPO wired into the loop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.config import load_config
from bench.sweep import run_sweep
from bench.trainer import METRIC_COLUMNS, train_run

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "run.model.hidden_size=32", "run.model.num_layers=1", "run.model.warmstart_steps=3",
    "run.model.warmstart_batch=8", "run.steps=3", "run.prompts_per_step=4", "run.samples_per_prompt=4",
    "run.micro_batch_size=8", "run.val_every=2", "run.val_size=16", "run.val_batch_size=16",
    "run.max_new_tokens=10", "run.lr=0.001",
]
TIMING = {"time_rollout_s", "time_update_s", "time_other_s", "peak_mem_mib"}


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"sweep.out_dir={tmp_path}", "sweep.workers=1", "sweep.report=false", *extra])


def comparable(result) -> pd.DataFrame:
    return pd.DataFrame(result.rows).drop(columns=sorted(TIMING))


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo", "grpo", "isopo_ni", "isopo_int", "cispo", "dr_grpo"])
def test_same_config_and_seed_give_identical_metrics(tmp_path, algorithm):
    cfg = tiny_config(tmp_path)
    first = train_run(cfg.run, algorithm, 7, tmp_path / "cache")
    second = train_run(cfg.run, algorithm, 7, tmp_path / "cache")
    assert first.status == "finished"
    a, b = comparable(first), comparable(second)
    pd.testing.assert_frame_equal(a, b)
    # Every step trained and the metrics are real numbers.
    assert list(a["step"]) == [0, 1, 2, 3]
    assert a.loc[1:, ["reward_mean", "kl", "entropy", "grad_norm", "response_len"]].notna().all().all()
    assert a["val_acc"].notna().tolist() == [True, False, True, True]


def test_another_seed_changes_the_run(tmp_path):
    cfg = tiny_config(tmp_path)
    a = comparable(train_run(cfg.run, "grpo", 0, tmp_path / "cache"))
    b = comparable(train_run(cfg.run, "grpo", 1, tmp_path / "cache"))
    assert not a.equals(b)


def test_every_algorithm_sees_the_same_first_rollout(tmp_path):
    """Same seed ⇒ same weights, prompts and sampling noise: the first batch's reward is identical."""
    cfg = tiny_config(tmp_path)
    first_rewards = {
        name: train_run(cfg.run, name, 3, tmp_path / "cache").rows[1]["reward_mean"]
        for name in ("reinforce", "grpo", "isopo_ni")
    }
    assert len(set(first_rewards.values())) == 1


def test_isopo_with_zero_exponents_trains_like_reinforce(tmp_path):
    """The transform wired into the loop: p = q = r = 0 must reproduce REINFORCE's run."""
    cfg = tiny_config(tmp_path, "run.model.dtype=float64")
    base = comparable(train_run(cfg.run, "reinforce", 0, tmp_path / "cache"))
    via_isopo = comparable(train_run(cfg.run, "isopo_ni", 0, tmp_path / "cache",
                                     per_algorithm={"isopo": {"setting": "reinforce"}}))
    for column in ("reward_mean", "kl", "grad_norm", "val_acc", "loss"):
        if column == "loss":  # ISOPO back-propagates the advantage-free loss: a different number by design
            continue
        pd.testing.assert_series_equal(base[column], via_isopo[column], rtol=1e-6, check_names=False)


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    cfg = tiny_config(tmp_path, "sweep.name=div", "sweep.algorithms=[grpo,reinforce]", "sweep.seeds=[0]",
                      "run.lr=1e30", "run.grad_clip=0", "sweep.algorithm_overrides={reinforce: {}}")
    run_sweep(cfg)
    runs = pd.read_csv(tmp_path / "div" / "runs.csv")
    assert len(runs) == 2
    assert set(runs["status"]) <= {"diverged", "finished"}
    assert (runs["status"] == "diverged").any()
    diverged = runs[runs["status"] == "diverged"].iloc[0]
    metrics = pd.read_parquet(tmp_path / "div" / "metrics.parquet")
    last = metrics[(metrics.algorithm == diverged.algorithm)].step.max()
    assert last == diverged.diverged_step


def test_sweep_writes_tidy_tables_and_mlflow_runs(tmp_path):
    import mlflow

    cfg = tiny_config(tmp_path, "sweep.name=tidy", "sweep.algorithms=[reinforce,isopo_int]", "sweep.seeds=[0,1]")
    run_sweep(cfg)
    out = tmp_path / "tidy"
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == ["sweep", "algorithm", "seed", "step", *METRIC_COLUMNS]
    pd.testing.assert_frame_equal(metrics, pd.read_csv(out / "metrics.csv"), check_dtype=False)
    assert len(metrics) == 2 * 2 * 4 and not metrics.duplicated(["algorithm", "seed", "step"]).any()
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(zip(runs.algorithm, runs.seed)) == [("isopo_int", 0), ("isopo_int", 1), ("reinforce", 0),
                                                      ("reinforce", 1)]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["tidy"])
    assert sorted(found["tags.mlflow.runName"]) == sorted(f"{a}__seed{s}" for a, s in zip(runs.algorithm, runs.seed))
    one = found.iloc[0]
    assert one["params.run.lr"] == "0.001" and not math.isnan(one["metrics.reward_mean"])
    assert len(list((tmp_path / "mlartifacts").glob("*/artifacts/metrics.csv"))) == 4


def test_killed_sweep_resumes_with_every_run_exactly_once(tmp_path):
    import mlflow

    args = [sys.executable, "-m", "bench", "run", *TINY, "run.steps=6", f"sweep.out_dir={tmp_path}",
            "sweep.name=kill", "sweep.algorithms=[reinforce,grpo]", "sweep.seeds=[0,1]", "sweep.workers=1",
            "sweep.report=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs_dir = tmp_path / "kill" / "runs"
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # Kill it while the second run is in flight: one run done, one interrupted, two not started.
    while time.time() < deadline and len(list(runs_dir.glob("*/attempt.json"))) + len(
        list(runs_dir.glob("*/result.json"))
    ) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name for p in runs_dir.glob("*/result.json")}
    assert len(done_before) >= 1 and len(done_before) < 4

    finished = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"{len(done_before)} finished run(s) kept" in finished.stdout
    runs = pd.read_csv(tmp_path / "kill" / "runs.csv")
    assert sorted(zip(runs.algorithm, runs.seed)) == [("grpo", 0), ("grpo", 1), ("reinforce", 0), ("reinforce", 1)]
    metrics = pd.read_parquet(tmp_path / "kill" / "metrics.parquet")
    assert not metrics.duplicated(["algorithm", "seed", "step"]).any() and len(metrics) == 4 * 7
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    active = mlflow.search_runs(experiment_names=["kill"])  # deleted (interrupted) attempts are not listed
    assert sorted(active["tags.mlflow.runName"]) == sorted(f"{a}__seed{s}" for a, s in zip(runs.algorithm, runs.seed))
    # The finished run was not redone: its MLflow run is the one recorded before the kill.
    for name in done_before:
        before = json.loads((runs_dir / name / "result.json").read_text())["mlflow_run_id"]
        assert before in set(runs.mlflow_run_id)
