"""Assemble results/<sweep>/report.md with its tables (CSV, LaTeX) and figures (PNG, PDF)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis.atomic import atomic_write_text
from analysis.errors import ResultsError
from analysis.load import UNKNOWN_STATUS, config_facts, load_overhead, load_sweep
from analysis.overhead import overhead_table, scaling_table
from analysis.palette import order_algorithms
from analysis.plots import make_figures
from analysis.stability import run_stability, spread_over_time, stability_summary
from analysis.stats import compare, run_accuracy, summarize
from analysis.tables import to_markdown, write_table

HOW_TO_READ = """\
**How to read this.** Every number summarises independent runs (seeds) of one algorithm; *n* is the
number of seeds behind it. *Final* accuracy is the mean of a run's last 3 validation evaluations, *best*
its highest, *AUC* the area under its validation curve divided by the step span (an average accuracy over
training) and *gain* final minus the accuracy at step 0. The **median** and **IQR** (25th–75th percentile)
describe the spread across seeds. The **IQM** (interquartile mean: the mean of the middle half of seeds)
is a robust average; its 95 % CI comes from a stratified bootstrap over seeds, so a wide interval means
the seeds disagree or there are few of them. The **probability of improvement** P(X > Y) is the chance
that a random seed of the algorithm beats a random seed of the baseline (ties count one half): 0.5 means
no difference, values near 1 a consistent win; its CI is a bootstrap over seeds. The **Wilcoxon p** tests
whether the per-seed differences (same seed = same prompts and initial weights) are centred on zero: a
small p (say < 0.05) means the difference is unlikely to be seed noise; it says nothing about its size
(see the median difference). When the two algorithms do not share seeds, a Mann–Whitney U test is used
instead; a blank p comes with a note saying why no test was possible."""


def write_report(
    sweep_dir: str | Path,
    overhead_dir: str | Path | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    spike_k: float = 5.0,
    collapse_margin: float = 0.1,
    entropy_fraction: float = 0.1,
) -> Path:
    """Analyse ``results/<sweep>`` and write report.md, tables/ and figures/ there; returns report.md.

    ``overhead_dir`` defaults to the sweep's sibling ``overhead/`` folder when that exists; the overhead
    section appears only when it holds JSON files. Raises ResultsError on missing or malformed results.
    """
    sweep_dir = Path(sweep_dir)
    metrics, runs, config = load_sweep(sweep_dir)
    overhead, scaling = _overhead(sweep_dir, overhead_dir)

    per_run = run_accuracy(metrics, runs)
    used = per_run[per_run["status"] != "failed"]
    if used["final"].isna().all():
        raise ResultsError(f"no run in {sweep_dir} that did not fail has a validation accuracy")
    summary = summarize(used, n_boot=n_boot, seed=seed)
    comparisons = compare(used, n_boot=n_boot, seed=seed)
    stab_runs = run_stability(metrics, runs, k=spike_k, margin=collapse_margin,
                              entropy_fraction=entropy_fraction)
    stab = stability_summary(stab_runs)
    # Figures and the spread table show the same runs as the accuracy tables: failed runs are left out.
    used_metrics = metrics.merge(used[["algorithm", "seed"]], on=["algorithm", "seed"])
    spread = spread_over_time(used_metrics, "val_acc")

    tables = {
        "runs": _runs_overview(runs, metrics),
        "accuracy": _percent(summary, ["median", "q25", "q75", "iqm", "iqm_lo", "iqm_hi"]),
        "accuracy_runs": _percent(per_run, ["acc0", "final", "best", "auc", "gain"]),
        "comparisons": _percent(comparisons, ["median_diff"]),
        "stability": stab,
        "stability_runs": stab_runs,
        "val_acc_spread": _percent(spread, ["median", "q25", "q75", "iqr"]),
    }
    if overhead is not None:
        tables["overhead"] = overhead
    if scaling is not None:
        tables["overhead_scaling"] = scaling
    tex_missing = False
    for name, df in tables.items():
        tex_missing |= "tex" not in write_table(df, sweep_dir / "tables", name)
    figures = make_figures(used_metrics, sweep_dir / "figures", overhead, scaling)

    text = _render(sweep_dir, metrics, runs, config, tables, figures, tex_missing,
                   collapse_margin, spike_k, entropy_fraction)
    return atomic_write_text(sweep_dir / "report.md", text)


def _overhead(sweep_dir: Path, overhead_dir: str | Path | None) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The overhead table and, when some file is a scaling sweep, the scaling table."""
    if overhead_dir is None:
        overhead_dir = sweep_dir.resolve().parent / "overhead"
        if not overhead_dir.is_dir():
            return None, None
    docs = load_overhead(overhead_dir)
    if not docs:
        return None, None
    scaling = scaling_table(docs)
    return overhead_table(docs), (scaling if len(scaling) else None)


def _percent(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    out = df.copy()
    out[columns] = out[columns] * 100.0
    return out


def _runs_overview(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Status counts per algorithm plus medians across runs of steps, wall time, time/step and memory."""
    time_cols = ["time_rollout_s", "time_update_s", "time_other_s"]
    per_step = metrics[time_cols].sum(axis=1, min_count=1)
    cost = metrics.assign(step_s=per_step).groupby(["algorithm", "seed"]).agg(
        step_s=("step_s", "mean"), peak_mib=("peak_mem_mib", "max"))
    rows = []
    for alg in order_algorithms(runs["algorithm"]):
        sub = runs[runs["algorithm"] == alg]
        counts = sub["status"].value_counts()
        row = {"algorithm": alg, "n_runs": len(sub)}
        for status in ("finished", "diverged", "failed", UNKNOWN_STATUS):
            if status != UNKNOWN_STATUS or status in counts:
                row[status] = int(counts.get(status, 0))
        row["median_steps_done"] = float(sub["steps_done"].median())
        row["median_wall_s"] = float(sub["wall_s"].median())
        alg_cost = cost.loc[alg] if alg in cost.index.get_level_values(0) else cost.iloc[0:0]
        row["median_step_s"] = float(alg_cost["step_s"].median())
        row["median_peak_mib"] = float(alg_cost["peak_mib"].median())
        rows.append(row)
    return pd.DataFrame(rows)


def _render(sweep_dir, metrics, runs, config, tables, figures, tex_missing, margin, spike_k, ent_frac) -> str:
    facts = config_facts(config)
    algorithms = order_algorithms(metrics["algorithm"])
    seeds_per_alg = metrics.groupby("algorithm")["seed"].nunique()
    sweeps = sorted(set(metrics["sweep"]))
    out = [f"# Sweep report: {', '.join(sweeps)}", ""]
    header = [
        ("Sweep", f"{', '.join(sweeps)} (`{sweep_dir}`)"),
        ("Task", facts.get("task", "not recorded (no config.yaml entry)")),
        ("Model", facts.get("model", "not recorded (no config.yaml entry)")),
        ("Algorithms (seeds run)", ", ".join(f"{a} (n={seeds_per_alg[a]})" for a in algorithms)),
        ("Seeds", ", ".join(str(s) for s in sorted(set(runs["seed"])))
         + (f" (config: {facts['seeds']})" if "seeds" in facts else "")),
        ("Steps", f"{int(metrics['step'].max())} in the metrics"
         + (f" (config: {facts['steps']})" if "steps" in facts else "")),
        ("Date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + " (report generated)"),
    ]
    out += [f"- **{k}:** {v}" for k, v in header]
    notes = []
    if (runs["status"] == UNKNOWN_STATUS).any():
        notes.append("runs.csv is absent: the run table was rebuilt from the metrics, so divergence is unknown.")
    n_failed = int((runs["status"] == "failed").sum())
    if n_failed:
        notes.append(f"{n_failed} failed run(s) are left out of the accuracy statistics and the fractions.")
    if tex_missing:
        notes.append("LaTeX tables were not written: pandas' to_latex needs jinja2, which is not installed.")
    out += [""] + [f"> Note: {n}" for n in notes] + ([""] if notes else [])
    out += [HOW_TO_READ, ""]

    def section(title: str, name: str, caption: str, empty: str = "No rows.") -> None:
        body = to_markdown(tables[name]) if len(tables[name]) else f"*{empty}*"
        out.extend([f"## {title}", "", caption, "", body, "",
                    f"Table files: [CSV](tables/{name}.csv), [LaTeX](tables/{name}.tex)", ""])

    def figure(name: str, caption: str) -> None:
        if name in figures:
            out.extend([f"![{caption}](figures/{name}.png)", "",
                        f"*{caption}.* [PDF](figures/{name}.pdf)", ""])

    section("Runs", "runs", "Runs per algorithm by status (n_runs seeds each), with medians across runs of "
            "steps done, wall time (s), time per step (rollout + update + other, s) and peak memory (MiB).")
    section("Accuracy", "accuracy",
            "Per algorithm and metric across n seeds: median, IQR (q25–q75) and IQM with its 95 % "
            "stratified-bootstrap CI. Accuracies in percent; gain in percentage points.")
    out.extend(["Per-run values (acc0 = accuracy at step 0, n_evals = validations in the run): "
                "[CSV](tables/accuracy_runs.csv), [LaTeX](tables/accuracy_runs.tex)", ""])
    figure("val_acc", "Validation accuracy: median across seeds with the IQR shaded")
    section("Comparisons against baselines", "comparisons",
            "Each algorithm against reinforce and grpo (where present), on final accuracy and AUC. "
            "poi = probability of improvement with its 95 % CI (poi_lo–poi_hi); n_algorithm / n_baseline "
            "seeds; n_pairs = seeds paired for the Wilcoxon test; median_diff in percentage points.",
            "No comparison: the sweep lacks reinforce and grpo, or has no other algorithm.")
    section("Stability", "stability",
            f"Per algorithm over n runs that did not fail. Collapsed = validation accuracy ends at least "
            f"{margin * 100:g} points below the run's best and stays there, or the run diverged; entropy "
            f"collapsed = final entropy below {ent_frac:g} × the initial; gradient spikes = steps whose "
            f"gradient norm exceeds {spike_k:g} × the running median of the earlier steps.")
    section("Stability per run", "stability_runs",
            f"One row per run ({len(tables['stability_runs'])} runs); max_kl is the largest per-step "
            "KL(π_new‖π_old) per token in nats.")
    for name, caption in (("reward", "Mean training reward"), ("kl", "KL between successive policies"),
                          ("entropy", "Policy entropy"), ("response_len", "Response length")):
        figure(name, f"{caption}: median across seeds with the IQR shaded")
    spread = tables["val_acc_spread"]
    pivot = spread.pivot(index="step", columns="algorithm", values="iqr")
    pivot = pivot[[a for a in algorithms if a in pivot.columns]].reset_index()
    n_text = ", ".join(f"{a}: n={int(spread.loc[spread['algorithm'] == a, 'n'].max())}"
                       for a in algorithms if a in set(spread["algorithm"]))
    out.extend(["## Spread of validation accuracy over time", "",
                f"Across-seed IQR of validation accuracy (percentage points) at each evaluated step ({n_text}). "
                "The full per-step table (n, median, q25, q75, iqr) is in the files below.", "",
                to_markdown(pivot), "",
                "Table files: [CSV](tables/val_acc_spread.csv), [LaTeX](tables/val_acc_spread.tex)", ""])
    if "overhead" in tables:
        section("Overhead", "overhead",
                "Per benchmark file (device, date, model preset, B, T, whether the LM head ran on every "
                "position or on the response columns, whether ISOPO's layers ran through torch.compile or "
                "replayed their tails as CUDA graphs): "
                "median/min/max seconds per update, host_s (median seconds until the host had issued the "
                "step; on a GPU, close to median_s means the host's kernel launches set the pace) and peak "
                "memory (MiB), with ratios to reinforce measured in the same file; paired_lo/paired_hi bound "
                "the paired ratio (median of the rounds' own ratios) with 95 % confidence; flop_ratio is the "
                "step's counted FLOPs over reinforce's (on a CPU, where the matmuls set the pace, the floor of "
                "time_ratio; on a GPU, the arithmetic a mode adds).")
        figure("overhead", "Time and peak memory relative to reinforce (dashed line: parity)")
    if "overhead_scaling" in tables:
        section("Overhead scaling", "overhead_scaling",
                "From `python -m bench overhead --scaling` files: per point (B sequences of T tokens) and mode, "
                "the median seconds per update and its ratios to reinforce at the same point (time, paired "
                "time, counted FLOPs, peak memory). The T sweep holds B at fixed_batch, the B sweep holds T at "
                "fixed_seq_len.")
        figure("overhead_scaling", "Time per update relative to reinforce as T and B grow (dashed line: parity)")
    return "\n".join(out).rstrip() + "\n"
