"""Stability diagnostics on hand-made curves with known answers."""

import numpy as np
import pandas as pd
import pytest

from analysis.load import derive_runs
from analysis.stability import (
    accuracy_collapse,
    entropy_collapse,
    grad_spikes,
    run_stability,
    spread_over_time,
    stability_summary,
)
from analysis.synthetic import runs_from_metrics, synthetic_metrics

STEPS = [0, 10, 20, 30, 40, 50]


def test_collapse_that_stays_down_is_detected_at_its_start():
    collapsed, step = accuracy_collapse(STEPS, [0.2, 0.5, 0.6, 0.3, 0.25, 0.2])
    assert collapsed and step == 30


def test_dip_that_recovers_is_not_collapse():
    collapsed, step = accuracy_collapse(STEPS, [0.2, 0.5, 0.6, 0.3, 0.55, 0.6])
    assert not collapsed and np.isnan(step)


def test_drop_smaller_than_margin_is_not_collapse_and_margin_is_a_parameter():
    acc = [0.2, 0.5, 0.6, 0.55, 0.52, 0.53]
    assert not accuracy_collapse(STEPS, acc)[0]
    assert accuracy_collapse(STEPS, acc, margin=0.05) == (True, 30.0)


def test_collapse_after_a_recovery_counts_from_the_last_drop():
    collapsed, step = accuracy_collapse(STEPS, [0.2, 0.6, 0.3, 0.6, 0.4, 0.35])
    assert collapsed and step == 40


def test_collapse_ignores_unevaluated_steps():
    acc = [0.2, np.nan, 0.6, np.nan, 0.3, np.nan]
    assert accuracy_collapse(STEPS, acc) == (True, 40.0)


def test_grad_spikes_against_running_median():
    g = [np.nan, 1.0, 1.2, 0.9, 10.0, 1.0, 1.1, 6.0]
    assert grad_spikes(g, k=5).tolist() == [False, False, False, False, True, False, False, True]
    assert grad_spikes(g, k=7).sum() == 1
    # The first norm has no history to compare with.
    assert grad_spikes([100.0, 1.0, 1.0]).sum() == 0


def test_entropy_collapse():
    assert entropy_collapse([np.nan, 2.0, 1.0, 0.1]) == (2.0, 0.1, True)
    assert entropy_collapse([np.nan, 2.0, 1.0, 0.5])[2] is False
    assert entropy_collapse([np.nan, 2.0, 0.5], fraction=0.5)[2] is True


def hand_made_metrics() -> pd.DataFrame:
    m = synthetic_metrics({"reinforce": 0.2, "grpo": 0.2}, seeds=[0, 1, 2, 3], steps=20, noise_sd=0.0)
    # grpo seed 1 collapses: accuracy falls far below its best from step 15 on.
    sel = (m.algorithm == "grpo") & (m.seed == 1) & (m.step >= 15)
    m.loc[sel & m.val_acc.notna(), "val_acc"] = 0.0
    # reinforce seed 2 has one gradient-norm spike and a collapsed entropy.
    sel = (m.algorithm == "reinforce") & (m.seed == 2)
    m.loc[sel & (m.step == 12), "grad_norm"] = 50.0
    m.loc[sel & (m.step == 20), "entropy"] = 0.01
    m.loc[sel & (m.step == 7), "kl"] = 3.5
    return m


def test_run_stability_and_summary():
    m = hand_made_metrics()
    runs = runs_from_metrics(m, {("grpo", 2): "diverged", ("reinforce", 3): "failed"})
    per_run = run_stability(m, runs).set_index(["algorithm", "seed"])
    assert per_run.loc[("grpo", 1), "acc_collapsed"] and per_run.loc[("grpo", 1), "collapse_step"] == 15
    assert per_run.loc[("grpo", 2), "collapsed"] and not per_run.loc[("grpo", 2), "acc_collapsed"]
    assert per_run.loc[("reinforce", 2), "grad_spikes"] == 1
    assert per_run.loc[("reinforce", 2), "entropy_collapsed"]
    assert per_run.loc[("reinforce", 2), "max_kl"] == pytest.approx(3.5)
    assert per_run["grad_spikes"].drop(("reinforce", 2)).eq(0).all()

    summary = stability_summary(per_run.reset_index()).set_index("algorithm")
    assert summary.loc["grpo", "n"] == 4
    assert summary.loc["grpo", "frac_collapsed"] == pytest.approx(0.5)
    assert summary.loc["grpo", "frac_diverged"] == pytest.approx(0.25)
    # The failed run is left out of the fractions.
    assert summary.loc["reinforce", "n"] == 3 and summary.loc["reinforce", "n_failed"] == 1
    assert summary.loc["reinforce", "frac_entropy_collapsed"] == pytest.approx(1 / 3)
    assert summary.loc["reinforce", "frac_collapsed"] == 0


def test_run_without_metrics_still_gets_a_row():
    m = synthetic_metrics({"reinforce": 0.1}, seeds=[0], steps=5)
    runs = pd.concat([runs_from_metrics(m), derive_runs(m).assign(seed=7, status="diverged")])
    per_run = run_stability(m, runs).set_index("seed")
    assert per_run.loc[7, "collapsed"] and np.isnan(per_run.loc[7, "max_kl"])


def test_spread_over_time_matches_numpy():
    m = synthetic_metrics({"reinforce": 0.1, "isopo_int": 0.3}, seeds=range(6), steps=10, eval_every=5)
    out = spread_over_time(m, "val_acc")
    assert set(out["step"]) == {0, 5, 10}
    assert list(dict.fromkeys(out["algorithm"])) == ["reinforce", "isopo_int"]
    for row in out.itertuples():
        x = m[(m.algorithm == row.algorithm) & (m.step == row.step)]["val_acc"].to_numpy()
        q25, med, q75 = np.percentile(x, [25, 50, 75])
        assert (row.n, row.median, row.q25, row.q75) == (6, pytest.approx(med), pytest.approx(q25),
                                                         pytest.approx(q75))
        assert row.iqr == pytest.approx(q75 - q25)
