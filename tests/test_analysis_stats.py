"""Known-answer tests for analysis.stats: per-run summaries, aggregates, bootstrap CIs, tests."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.stats import (
    compare,
    curve_summary,
    iqm,
    iqm_ci,
    median_ci,
    paired_test,
    poi_ci,
    probability_of_improvement,
    run_accuracy,
    stratified_bootstrap,
    summarize,
)
from analysis.synthetic import synthetic_metrics


def per_run_table(values: dict[str, np.ndarray], metric: str = "final") -> pd.DataFrame:
    return pd.DataFrame([{"algorithm": a, "seed": s, metric: float(v)}
                         for a, xs in values.items() for s, v in enumerate(xs)])


def test_curve_summary_known_values_and_ignores_unevaluated_steps():
    steps = [0, 5, 10, 15, 20, 25, 30]
    acc = [0.2, np.nan, 0.4, np.nan, 0.6, np.nan, 0.5]
    out = curve_summary(steps, acc)
    assert out["n_evals"] == 4
    assert out["acc0"] == pytest.approx(0.2)
    assert out["final"] == pytest.approx((0.4 + 0.6 + 0.5) / 3)
    assert out["best"] == pytest.approx(0.6)
    # Trapezoids of width 10: (0.3 + 0.5 + 0.55) * 10 / 30.
    assert out["auc"] == pytest.approx(0.45)
    assert out["gain"] == pytest.approx(0.5 - 0.2)


def test_curve_summary_short_and_unsorted_curves():
    out = curve_summary([20, 0], [0.7, 0.1], last_k=3)
    assert out["final"] == pytest.approx(0.4)  # only two evaluations: their mean
    assert out["auc"] == pytest.approx(0.4)
    no_step0 = curve_summary([10, 20], [0.3, 0.5])
    assert np.isnan(no_step0["acc0"]) and np.isnan(no_step0["gain"])
    assert curve_summary([0, 1], [np.nan, np.nan])["n_evals"] == 0


def test_run_accuracy_one_row_per_run():
    m = synthetic_metrics({"reinforce": 0.1, "grpo": 0.2}, seeds=[3, 5, 9], steps=10)
    out = run_accuracy(m)
    assert len(out) == 6
    assert set(out["seed"]) == {3, 5, 9}
    one = m[(m.algorithm == "grpo") & (m.seed == 5)].dropna(subset=["val_acc"])
    row = out[(out.algorithm == "grpo") & (out.seed == 5)].iloc[0]
    assert row["final"] == pytest.approx(one["val_acc"].iloc[-3:].mean())
    assert row["best"] == pytest.approx(one["val_acc"].max())


def test_summarize_matches_numpy_and_scipy():
    rng = np.random.default_rng(1)
    values = {"reinforce": rng.uniform(0.2, 0.6, 9), "isopo_ni": rng.uniform(0.3, 0.7, 6)}
    per_run = per_run_table(values)
    per_run.loc[0, "final"] = np.nan  # a run without validations must not count towards n
    out = summarize(per_run, metrics=["final"], n_boot=300).set_index("algorithm")
    for alg, xs in values.items():
        xs = xs[1:] if alg == "reinforce" else xs
        row = out.loc[alg]
        assert row["n"] == len(xs)
        assert row["median"] == pytest.approx(np.median(xs))
        assert row["q25"] == pytest.approx(np.percentile(xs, 25))
        assert row["q75"] == pytest.approx(np.percentile(xs, 75))
        assert row["iqm"] == pytest.approx(sps.trim_mean(xs, 0.25))
        assert row["iqm_lo"] <= row["iqm"] <= row["iqm_hi"]
    assert list(out.index) == ["reinforce", "isopo_ni"]  # fixed algorithm order, not alphabetical


def test_iqm_is_mean_of_middle_half():
    x = np.array([100.0, 1, 2, 3, 4, 5, 6, -50])
    assert iqm(x) == pytest.approx(np.mean([2, 3, 4, 5]))


def test_stratified_bootstrap_keeps_stratum_sizes():
    # Constant within each stratum: any stratified resample has mean exactly 3/10, a plain one would not.
    values = np.array([1.0] * 3 + [0.0] * 7)
    strata = ["a"] * 3 + ["b"] * 7
    reps = stratified_bootstrap(values, np.mean, strata=strata, n_boot=200, rng=0)
    assert reps.shape == (200,)
    np.testing.assert_allclose(reps, 0.3)
    plain = stratified_bootstrap(values, np.mean, n_boot=200, rng=0)
    assert plain.std() > 0.05


def test_iqm_ci_coverage_of_known_distribution():
    # IQM of a normal is its mean; a 95 % CI should cover it in roughly 95 % of repeats.
    rng = np.random.default_rng(123)
    true_iqm, repeats = 0.5, 200
    covered = 0
    for _ in range(repeats):
        x = rng.normal(true_iqm, 0.1, size=20)
        _, lo, hi = iqm_ci(x, n_boot=1000, rng=rng)
        covered += lo <= true_iqm <= hi
    assert 0.88 <= covered / repeats <= 0.99


def test_probability_of_improvement_agrees_with_mann_whitney_u():
    x, y = np.array([1.0, 2.0]), np.array([1.0, 0.0])
    assert probability_of_improvement(x, y) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 12).astype(float), rng.integers(0, 5, 9).astype(float)
    u = sps.mannwhitneyu(a, b).statistic
    assert probability_of_improvement(a, b) == pytest.approx(u / (len(a) * len(b)))
    assert np.isnan(probability_of_improvement([], b))


def paired_sweep(delta: float, n: int = 8, seed: int = 0, noise: float = 0.02) -> pd.DataFrame:
    """Paired per-run finals: seed effects shared, the candidate shifted by ``delta`` plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.5, 0.05, n)
    cand = base + delta + rng.normal(0, noise, n)
    return per_run_table({"reinforce": base, "isopo_ni": cand})


def test_planted_difference_is_significant():
    out = compare(paired_sweep(0.2), metrics=["final"], n_boot=1000)
    row = out.iloc[0]
    assert (row["algorithm"], row["baseline"], row["test"]) == ("isopo_ni", "reinforce", "wilcoxon")
    assert row["n_pairs"] == 8 and row["n_algorithm"] == 8 and row["n_baseline"] == 8
    assert row["p_value"] < 0.05
    assert row["poi"] > 0.95 and row["poi_lo"] > 0.8
    assert row["median_diff"] == pytest.approx(0.2, abs=0.03)


def test_identical_algorithms_are_not_significant():
    out = compare(paired_sweep(0.0, seed=4), metrics=["final"], n_boot=1000)
    row = out.iloc[0]
    assert row["p_value"] > 0.05
    assert abs(row["poi"] - 0.5) < 0.2
    assert row["poi_lo"] < 0.5 < row["poi_hi"]


def test_exact_copies_give_nan_p_with_reason_and_poi_half():
    xs = np.linspace(0.3, 0.6, 8)
    row = compare(per_run_table({"reinforce": xs, "grpo": xs}), metrics=["final"], n_boot=200).iloc[0]
    assert np.isnan(row["p_value"])
    assert "all paired differences are zero" in row["note"]
    assert row["poi"] == pytest.approx(0.5)


def test_paired_test_small_n_and_unpaired():
    one = paired_test(pd.Series([0.5], index=[0]), pd.Series([0.3], index=[0]))
    assert np.isnan(one["p_value"]) and "need at least 2" in one["note"]
    three = paired_test(pd.Series([0.5, 0.6, 0.7]), pd.Series([0.3, 0.35, 0.4]))
    assert three["test"] == "wilcoxon" and three["p_value"] >= 0.05
    assert "cannot reach p<0.05" in three["note"]
    unpaired = paired_test(pd.Series([0.5, 0.6, 0.7, 0.8], index=[0, 1, 2, 3]),
                           pd.Series([0.1, 0.2, 0.3, 0.25], index=[4, 5, 6, 7]))
    assert unpaired["test"] == "mannwhitneyu"
    expected = sps.mannwhitneyu([0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.25]).pvalue
    assert unpaired["p_value"] == pytest.approx(expected)


def test_compare_uses_only_present_baselines_and_no_reverse_duplicates():
    rng = np.random.default_rng(2)
    per_run = per_run_table({a: rng.uniform(0, 1, 5) for a in ("reinforce", "grpo", "cispo")})
    out = compare(per_run, metrics=["final"], n_boot=100)
    pairs = set(zip(out["algorithm"], out["baseline"]))
    assert pairs == {("grpo", "reinforce"), ("cispo", "reinforce"), ("cispo", "grpo")}
    only_grpo = compare(per_run[per_run.algorithm != "reinforce"], metrics=["final"], n_boot=100)
    assert set(only_grpo["baseline"]) == {"grpo"}


def test_poi_ci_brackets_estimate():
    p, lo, hi = poi_ci([0.6, 0.7, 0.5, 0.65], [0.5, 0.55, 0.6, 0.4], n_boot=500)
    assert lo <= p <= hi and 0 <= lo and hi <= 1


@pytest.mark.parametrize(("n", "ranks"), [(6, (1, 6)), (15, (4, 12)), (20, (6, 15)), (30, (10, 21))])
def test_median_ci_is_the_textbook_pair_of_order_statistics(n, ranks):
    x = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))  # value = rank
    assert median_ci(x) == ranks
    # Its coverage, from the binomial distribution directly: the median lies between the two order
    # statistics unless fewer than `lo` or more than `hi - 1` values fall below it.
    lo, hi = ranks
    coverage = sps.binom.cdf(hi - 1, n, 0.5) - sps.binom.cdf(lo - 1, n, 0.5)
    assert coverage >= 0.95
    narrower = sps.binom.cdf(hi - 2, n, 0.5) - sps.binom.cdf(lo, n, 0.5)
    assert narrower < 0.95


def test_median_ci_too_few_values_is_nan():
    assert all(np.isnan(median_ci([1.0, 2.0, 3.0, 4.0, 5.0])))
    assert all(np.isnan(median_ci([])))
