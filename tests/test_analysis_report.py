"""Loading, validation errors, the report end to end, and the command line."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import ErrorbarContainer

from analysis import ResultsError
from analysis.__main__ import main
from analysis.load import METRIC_COLUMNS, config_facts, load_overhead, load_sweep
from analysis.overhead import overhead_table, scaling_table
from analysis.palette import algorithm_colors
from analysis.plots import plot_overhead, plot_scaling
from analysis.report import write_report
from analysis.stats import run_accuracy
from analysis.synthetic import runs_from_metrics, synthetic_metrics, write_sweep

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = {"reinforce": 0.1, "grpo": 0.15, "isopo_ni": 0.3, "my_variant": 0.05}
CONFIG = {"task": {"name": "arith-3digit"}, "model": {"name": "tiny-lm"}, "train": {"steps": 10},
          "seeds": [0, 1, 2, 3, 4]}
TABLES = ("runs", "accuracy", "accuracy_runs", "comparisons", "stability", "stability_runs", "val_acc_spread", "overhead",
          "overhead_scaling")
FIGURES = ("val_acc", "reward", "kl", "entropy", "response_len", "overhead", "overhead_scaling")


def overhead_doc(device: str, isopo_ratio: float) -> dict:
    def entry(ratio: float) -> dict:
        return {"median_s": ratio, "min_s": 0.9 * ratio, "max_s": 1.1 * ratio, "ratio_vs_reinforce": ratio,
                "peak_mib": 1000 * ratio, "peak_ratio_vs_reinforce": ratio}

    return {"device": device, "date": "2025-06-01", "command": "python -m bench overhead", "config": {},
            "results": {"reinforce": entry(1.0), "isopo_ni": entry(isopo_ratio),
                        "isopo_ni_hooks": entry(isopo_ratio + 0.3)}}


def scaling_doc(device: str) -> dict:
    """A --scaling file: T sweep 256, 512, 1024 at B=8 and B sweep 4, 8 at T=1024; isopo's ratio grows with T."""
    def entry(ratio: float) -> dict:
        return {"median_s": ratio, "min_s": ratio, "max_s": ratio, "ratio_vs_reinforce": ratio,
                "paired_ratio_median": ratio, "peak_mib": 100 * ratio, "peak_ratio_vs_reinforce": ratio}

    points = [{"batch": b, "seq_len": t, "results": {"reinforce": entry(1.0), "isopo_int": entry(1.0 + t / 10240)}}
              for b, t in ((8, 256), (8, 512), (8, 1024), (4, 1024))]
    return {"device": device, "date": "2025-06-02", "command": "python -m bench overhead --scaling",
            "config": {"model": "small", "batch": 8, "seq_len": 1024, "lm_head": "all"}, "points": points,
            "results": points[2]["results"], "results_point": {"batch": 8, "seq_len": 1024}}


def small_sweep(path: Path, **kwargs) -> Path:
    m = synthetic_metrics(ALGORITHMS, seeds=range(5), steps=10, eval_every=2)
    runs = runs_from_metrics(m, {("grpo", 4): "diverged", ("my_variant", 2): "failed"})
    return write_sweep(path, m, **{"runs": runs, "config": CONFIG, **kwargs})


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    sweep = small_sweep(root / "sweep1")
    overhead = root / "bench_overhead"
    overhead.mkdir()
    for i, (device, ratio) in enumerate((("cpu", 1.4), ("gpu", 1.1))):
        (overhead / f"run{i}.json").write_text(json.dumps(overhead_doc(device, ratio)))
    (overhead / "scaling-small-cpu.json").write_text(json.dumps(scaling_doc("cpu")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["report", str(sweep), "--overhead-dir", str(overhead), "--n-boot", "300"])
    return sweep, rc, out.getvalue()


def test_cli_writes_report_and_prints_its_path(reported):
    sweep, rc, stdout = reported
    assert rc == 0
    assert stdout.strip().splitlines()[-1] == str(sweep / "report.md")


def test_report_files_exist_and_are_well_formed(reported):
    sweep, _, _ = reported
    for name in TABLES:
        assert (sweep / "tables" / f"{name}.csv").stat().st_size > 0
        assert "\\begin{tabular}" in (sweep / "tables" / f"{name}.tex").read_text()
    for name in FIGURES:
        assert (sweep / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (sweep / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    # Atomic writes leave no temporary files behind.
    assert not list(sweep.rglob("*.tmp"))


def test_report_content(reported):
    sweep, _, _ = reported
    text = (sweep / "report.md").read_text()
    for alg in ALGORITHMS:
        assert alg in text
    assert "reinforce (n=5)" in text and "arith-3digit" in text and "tiny-lm" in text
    assert "## Overhead" in text and "## Overhead scaling" in text and "How to read this" in text
    assert "1 failed run(s)" in text
    links = re.findall(r"\]\(((?:figures|tables)/[^)]+)\)", text)
    assert {f"figures/{n}.png" for n in FIGURES} <= set(links)
    for link in links:
        assert (sweep / link).exists(), link
    # Every table with seeds behind its numbers states how many.
    n_columns = {"runs": {"n_runs"}, "accuracy": {"n"}, "stability": {"n"}, "val_acc_spread": {"n"},
                 "comparisons": {"n_algorithm", "n_baseline", "n_pairs"}}
    for name, columns in n_columns.items():
        assert columns <= set(pd.read_csv(sweep / "tables" / f"{name}.csv").columns), name


def test_accuracy_table_matches_per_run_numbers(reported):
    sweep, _, _ = reported
    metrics, runs, _ = load_sweep(sweep)
    per_run = run_accuracy(metrics, runs)
    table = pd.read_csv(sweep / "tables" / "accuracy.csv")
    for alg in ALGORITHMS:
        finals = per_run[(per_run.algorithm == alg) & (per_run.status != "failed")]["final"].to_numpy()
        row = table[(table.algorithm == alg) & (table.metric == "final")].iloc[0]
        assert row["n"] == len(finals) == (4 if alg == "my_variant" else 5)
        assert row["median"] == pytest.approx(100 * np.median(finals))
        assert row["q25"] == pytest.approx(100 * np.percentile(finals, 25))
    stab = pd.read_csv(sweep / "tables" / "stability.csv").set_index("algorithm")
    assert stab.loc["grpo", "frac_diverged"] == pytest.approx(0.2)
    runs_table = pd.read_csv(sweep / "tables" / "runs.csv").set_index("algorithm")
    # Synthetic steps take 1.0 + 0.5 + 0.1 s; step 0 has no update and must not pull the mean down.
    assert runs_table["median_step_s"].tolist() == pytest.approx([1.6] * len(ALGORITHMS))
    assert runs_table.loc["my_variant", "failed"] == 1 and runs_table.loc["grpo", "diverged"] == 1


def test_package_exposes_write_report():
    import analysis

    assert analysis.write_report is write_report


def test_report_without_runs_config_or_overhead(tmp_path):
    # Neither baseline is present, so the comparison table is empty and the report says so.
    m = synthetic_metrics({"dr_grpo": 0.1, "cispo": 0.2}, seeds=range(3), steps=6, eval_every=3)
    sweep = write_sweep(tmp_path / "bare", m)
    text = write_report(sweep, n_boot=100).read_text()
    assert "## Overhead" not in text and "No comparison" in text
    assert "runs.csv is absent" in text and "not recorded" in text
    assert "cispo (n=3)" in text


def test_load_sweep_reads_csv_when_parquet_absent_and_ignores_extra_columns(tmp_path):
    m = synthetic_metrics({"reinforce": 0.1}, seeds=[0, 1], steps=4).assign(extra_metric=1.0)
    sweep = write_sweep(tmp_path / "s", m, runs_from_metrics(m))
    (sweep / "metrics.parquet").unlink()
    metrics, runs, config = load_sweep(sweep)
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert len(metrics) == len(m) and len(runs) == 2 and config == {}


def test_config_facts_finds_nested_keys():
    facts = config_facts({"task": "gsm8k", "model": {"path": "/m/smol"}, "trainer": {"total_steps": 50},
                          "seeds": [1, 2]})
    assert facts == {"task": "gsm8k", "model": "/m/smol", "steps": "50", "seeds": "1, 2"}


def test_overhead_table_derives_missing_ratios():
    doc = overhead_doc("cpu", 1.5)
    del doc["results"]["isopo_ni"]["ratio_vs_reinforce"]
    table = overhead_table([{**doc, "source": "x.json"}]).set_index("mode")
    assert table.loc["isopo_ni", "time_ratio"] == pytest.approx(1.5)
    assert table.loc["isopo_ni_hooks", "mem_ratio"] == pytest.approx(1.8)
    assert set(table["device"]) == {"cpu"} and set(table["date"]) == {"2025-06-01"}
    assert table["paired_lo"].isna().all()  # a file without the CI
    assert table["flop_ratio"].isna().all()  # nor the counted FLOPs


def test_overhead_table_reads_or_derives_the_flop_ratio():
    doc = overhead_doc("cpu", 1.07)
    doc["results"]["reinforce"]["gflop"] = 200.0
    doc["results"]["isopo_ni"].update(gflop=210.0, flop_ratio_vs_reinforce=1.05)
    doc["results"]["isopo_ni_hooks"]["gflop"] = 300.0  # no ratio written: derived from reinforce's count
    table = overhead_table([{**doc, "source": "x.json"}])
    assert table["flop_ratio"].tolist() == pytest.approx([1.0, 1.05, 1.5])
    fig = plot_overhead(table, algorithm_colors(table["mode"].str.removesuffix("_hooks")))
    ticks = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert [seg[0][1] for c in ticks for seg in c.get_segments()] == pytest.approx([1.0, 1.05, 1.5])
    assert not [c for c in fig.axes[1].collections if isinstance(c, LineCollection)]  # time panel only


def test_overhead_table_and_plot_show_the_paired_ratio_ci():
    doc = overhead_doc("cpu", 1.07)
    doc["results"]["isopo_ni"].update(paired_ratio_median=1.07, paired_ratio_ci95=[1.05, 1.09])
    table = overhead_table([{**doc, "source": "x.json"}])
    row = table.set_index("mode").loc["isopo_ni"]
    assert (row["paired_ratio"], row["paired_lo"], row["paired_hi"]) == (1.07, 1.05, 1.09)
    fig = plot_overhead(table, algorithm_colors(table["mode"].str.removesuffix("_hooks")))
    whiskers = [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(whiskers) == 1  # one mode of three has a CI
    (segment,) = whiskers[0].lines[2][0].get_segments()
    assert segment[:, 1].tolist() == pytest.approx([1.05, 1.09])


def test_overhead_table_names_each_files_shape_and_lm_head():
    single = {**overhead_doc("cpu", 1.2), "source": "a.json",
              "config": {"model": "small", "batch": 8, "seq_len": 1024, "lm_head": "response"}}
    scaling = {**overhead_doc("cpu", 1.1), "source": "scaling.json", "config": {"model": "tiny", "batch": 8,
               "seq_len": 1024}, "results_point": {"batch": 4, "seq_len": 256}}
    old = {**overhead_doc("cpu", 1.3), "source": "old.json", "config": "not a mapping"}
    table = overhead_table([single, scaling, old])
    rows = table.drop_duplicates("source").set_index("source")
    assert rows.loc["a.json", ["model", "batch", "seq_len", "lm_head"]].tolist() == ["small", 8, 1024, "response"]
    # A scaling file's results are those of its results_point; a file without the option ran every position.
    assert rows.loc["scaling.json", ["model", "batch", "seq_len", "lm_head"]].tolist() == ["tiny", 4, 256, "all"]
    assert rows.loc["old.json", "lm_head"] == "all" and pd.isna(rows.loc["old.json", "model"])
    # files from before these existed
    assert not table["compile"].any() and not table["cuda_graphs"].any() and table["host_s"].isna().all()


def test_overhead_table_carries_host_time_and_compile():
    doc = {**overhead_doc("NVIDIA H100", 1.4), "source": "c.json", "config": {"compile": True, "cuda_graphs": True}}
    doc["results"]["isopo_ni"]["host_median_s"] = 1.39
    table = overhead_table([doc]).set_index("mode")
    assert table.loc["isopo_ni", "host_s"] == pytest.approx(1.39) and pd.isna(table.loc["reinforce", "host_s"])
    assert table["compile"].all() and table["cuda_graphs"].all()


def break_parquet(d: Path) -> None:
    (d / "metrics.parquet").write_bytes(b"this is not parquet")


def drop_column(d: Path) -> None:
    pd.read_parquet(d / "metrics.parquet").drop(columns=["kl"]).to_parquet(d / "metrics.parquet")


def empty_table(d: Path) -> None:
    pd.read_parquet(d / "metrics.parquet").iloc[0:0].to_parquet(d / "metrics.parquet")


def bad_status(d: Path) -> None:
    runs = pd.read_csv(d / "runs.csv")
    runs.loc[0, "status"] = "exploded"
    runs.to_csv(d / "runs.csv", index=False)


def acc_out_of_range(d: Path) -> None:
    m = pd.read_parquet(d / "metrics.parquet")
    m.loc[0, "val_acc"] = 55.0  # a percentage where a fraction belongs
    m.to_parquet(d / "metrics.parquet")


def remove_metrics(d: Path) -> None:
    (d / "metrics.parquet").unlink()
    (d / "metrics.csv").unlink()


@pytest.mark.parametrize("damage, message", [
    (break_parquet, "cannot read"),
    (drop_column, "lacks required columns ['kl']"),
    (empty_table, "metrics table is empty"),
    (bad_status, "unknown status ['exploded']"),
    (acc_out_of_range, "val_acc outside [0, 1]"),
    (remove_metrics, "no metrics.parquet or metrics.csv"),
])
def test_bad_sweeps_raise_results_error(tmp_path, damage, message):
    sweep = small_sweep(tmp_path / "s")
    damage(sweep)
    with pytest.raises(ResultsError) as err:
        load_sweep(sweep)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(ResultsError, match="sweep directory not found"):
        load_sweep(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="sweep directory is empty"):
        load_sweep(tmp_path / "empty")


def test_scaling_table_has_a_row_per_point_and_mode_and_skips_single_files():
    docs = [{**scaling_doc("cpu"), "source": "scaling.json"}, {**overhead_doc("cpu", 1.2), "source": "one.json"}]
    table = scaling_table(docs)
    assert len(table) == 4 * 2 and set(table["source"]) == {"scaling.json"}
    t_sweep = table[(table["mode"] == "isopo_int") & (table["batch"] == table["fixed_batch"])]
    assert t_sweep.sort_values("seq_len")["seq_len"].tolist() == [256, 512, 1024]
    assert t_sweep.sort_values("seq_len")["time_ratio"].tolist() == pytest.approx([1.025, 1.05, 1.1])
    b_sweep = table[(table["mode"] == "isopo_int") & (table["seq_len"] == table["fixed_seq_len"])]
    assert sorted(b_sweep["batch"]) == [4, 8]
    assert (table.loc[table["mode"] == "reinforce", "time_ratio"] == 1.0).all()
    assert table["flop_ratio"].isna().all()  # a file from before the FLOPs were counted


def test_scaling_plot_draws_the_counted_flop_ratio_beside_the_time_ratio():
    doc = scaling_doc("cpu")
    for point in doc["points"]:
        point["results"]["reinforce"]["gflop"] = 100.0
        point["results"]["isopo_int"]["gflop"] = 100.0 + point["seq_len"] / 1024
    table = scaling_table([{**doc, "source": "scaling.json"}])
    t_sweep = table[(table["mode"] == "isopo_int") & (table["batch"] == 8)].sort_values("seq_len")
    assert t_sweep["flop_ratio"].tolist() == pytest.approx([1.0025, 1.005, 1.01])
    fig = plot_scaling(table, algorithm_colors(table["mode"]))
    crosses = [line for line in fig.axes[0].lines if line.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_ydata().tolist() == pytest.approx([1.0025, 1.005, 1.01])
    (b_crosses,) = [line for line in fig.axes[1].lines if line.get_marker() == "x"]
    assert b_crosses.get_ydata().tolist() == pytest.approx([1.01, 1.01])  # T = 1024 at B = 4 and 8


def test_bad_overhead_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"device": "cpu", "date": "d", "results": {"x": {}}}))
    with pytest.raises(ResultsError, match="lacks keys"):
        load_overhead(tmp_path)
    with pytest.raises(ResultsError, match="overhead directory not found"):
        load_overhead(tmp_path / "missing")
    doc = scaling_doc("cpu")
    doc["points"][1] = {"batch": 8, "results": {}}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match="point 1 needs batch, seq_len and results"):
        load_overhead(tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_error_is_one_line_and_non_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("report", str(tmp_path / "empty"))
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sweep directory is empty")
    assert "Traceback" not in proc.stderr


def test_cli_help():
    proc = run_cli("report", "--help")
    assert proc.returncode == 0 and "--overhead-dir" in proc.stdout
