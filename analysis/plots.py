"""Figures for the sweep report. Drawing only: the numbers come from analysis.stability / overhead.

Uses matplotlib's object API (Figure + Agg via savefig) rather than pyplot, so importing this module
never changes the caller's backend or leaves figures open in a training process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.atomic import atomic_write
from analysis.palette import algorithm_colors, order_algorithms
from analysis.stability import spread_over_time

STEP_LABEL = "training step (rollout batches)"

# name -> (column, y label, title, scale, log_y); scale turns fractions into percent; KL gets a log axis
# because it spans orders of magnitude between algorithms.
CURVES = {
    "val_acc": ("val_acc", "accuracy (%)", "Validation accuracy", 100.0, False),
    "reward": ("reward_mean", "mean reward per response", "Training reward", 1.0, False),
    "kl": ("kl", "KL(π_new ‖ π_old) per token (nats)", "KL between successive policies", 1.0, True),
    "entropy": ("entropy", "entropy (nats/token)", "Policy entropy", 1.0, False),
    "response_len": ("response_len", "response length (tokens)", "Response length", 1.0, False),
}


def save_figure(fig: Figure, stem: str | Path, dpi: int = 150) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf atomically; returns both paths."""
    stem = Path(stem)
    paths = []
    for fmt in ("png", "pdf"):
        path = stem.with_suffix(f".{fmt}")
        atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))
        paths.append(path)
    return paths


def plot_curve(
    metrics: pd.DataFrame,
    column: str,
    ylabel: str,
    title: str,
    colors: dict[str, str],
    scale: float = 1.0,
    log_y: bool = False,
) -> Figure | None:
    """Median line and IQR band across seeds per algorithm; None when ``column`` has no data.

    With ``log_y`` the y axis is logarithmic, provided every plotted value is positive.
    """
    bands = spread_over_time(metrics, column)
    if bands.empty:
        return None
    seeds = metrics.dropna(subset=[column]).groupby("algorithm")["seed"].nunique()
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    for alg in order_algorithms(bands["algorithm"]):
        b = bands[bands["algorithm"] == alg]
        color = colors[alg]
        ax.plot(b["step"], b["median"] * scale, color=color, lw=1.8, label=f"{alg} (n={seeds[alg]})",
                marker="o" if len(b) <= 30 else None, ms=3)
        ax.fill_between(b["step"], b["q25"] * scale, b["q75"] * scale, color=color, alpha=0.2, lw=0)
    values = bands[["median", "q25", "q75"]].to_numpy()
    if log_y and np.all(values > 0):
        ax.set_yscale("log")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (median and IQR across seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title="algorithm (seeds)", title_fontsize="small")
    fig.tight_layout()
    return fig


def mode_color(mode: str, colors: dict[str, str]) -> str:
    """A ``*_hooks`` mode shares its algorithm's colour (its bars are hatched instead)."""
    base = mode.removesuffix("_hooks")
    return colors[base] if mode != base and base in colors else colors[mode]


def plot_overhead(table: pd.DataFrame, colors: dict[str, str]) -> Figure | None:
    """Time and peak-memory ratios vs reinforce: one bar group per device/config, one bar per mode; over a
    time bar, where the file has them, the paired ratio with its 95 % CI (dot and whiskers) and the counted
    FLOP ratio (a red tick across the bar)."""
    if table.empty:
        return None
    groups = list(dict.fromkeys(table["group"]))
    widest = int(table.groupby("group")["mode"].nunique().max())
    width = 0.8 / widest
    fig = Figure(figsize=(max(8.0, 0.35 * len(groups) * widest + 4), 4.5))
    axes = fig.subplots(1, 2)
    for ax, col, label in ((axes[0], "time_ratio", "time per update"), (axes[1], "mem_ratio", "peak memory")):
        seen = set()
        for gi, group in enumerate(groups):
            # Bars are packed and centred within each group, so a file with fewer modes leaves no gaps.
            sub = table[table["group"] == group]
            offsets = (np.arange(len(sub)) - (len(sub) - 1) / 2) * width
            for x, row in zip(gi + offsets, sub.itertuples(index=False)):
                ax.bar(x, getattr(row, col), width, color=mode_color(row.mode, colors), edgecolor="black",
                       lw=0.5, hatch="//" if row.mode.endswith("_hooks") else None,
                       label=None if row.mode in seen else row.mode)
                seen.add(row.mode)
                if col == "time_ratio" and np.isfinite(row.paired_lo) and np.isfinite(row.paired_hi):
                    # The paired ratio (median of the rounds' own ratios) and its 95 % CI over the bar.
                    ax.errorbar(x, row.paired_ratio, yerr=[[row.paired_ratio - row.paired_lo],
                                                           [row.paired_hi - row.paired_ratio]],
                                fmt="o", color="black", ms=2.5, lw=1, capsize=2)
                if col == "time_ratio" and np.isfinite(row.flop_ratio):
                    ax.hlines(row.flop_ratio, x - width / 2, x + width / 2, color="tab:red", lw=1.5)
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xticks(np.arange(len(groups)), [g.replace(" (", "\n(") for g in groups], fontsize="small")
        ax.set_ylabel(f"{label} / reinforce (ratio)")
        ax.set_title(label.capitalize())
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Overhead relative to reinforce\n(dashed line: parity; whiskers: paired ratio, 95 % CI; "
                 "red tick: counted FLOPs)", fontsize="medium")
    axes[1].legend(fontsize="small", title="mode", title_fontsize="small", loc="center left",
                   bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


LINESTYLES = ("-", "--", ":", "-.")


def plot_scaling(table: pd.DataFrame, colors: dict[str, str]) -> Figure | None:
    """Time ratio vs reinforce as T grows (at the sweep's B) and as B grows (at its T): one line per mode,
    one line style per scaling file; where the file has them, the counted FLOP ratios as a faint line of
    crosses in the mode's colour."""
    table = table[table["mode"] != "reinforce"]
    if table.empty:
        return None
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((axes[0], "seq_len", "batch", "fixed_batch", "sequence length T (tokens)", "B"),
              (axes[1], "batch", "seq_len", "fixed_seq_len", "sequences per micro-batch B", "T"))
    groups = list(dict.fromkeys(table["group"]))
    for ax, x_col, fixed_col, fixed_cfg, xlabel, fixed_name in panels:
        fixed_values, x_values = set(), set()
        for gi, group in enumerate(groups):
            sub = table[(table["group"] == group) & (table[fixed_col] == table[fixed_cfg])]
            fixed_values |= set(sub[fixed_col])
            x_values |= set(sub[x_col])
            for mode in dict.fromkeys(sub["mode"]):
                line = sub[sub["mode"] == mode].sort_values(x_col)
                if line.empty:
                    continue
                label = mode if len(groups) == 1 else f"{mode}, {group}"
                style = {"color": mode_color(mode, colors), "ls": LINESTYLES[gi % len(LINESTYLES)]}
                ax.plot(line[x_col], line["time_ratio"], marker="o", label=label, **style)
                if line["flop_ratio"].notna().any():
                    ax.plot(line[x_col], line["flop_ratio"], marker="x", ms=4, lw=0.8, alpha=0.6, **style)
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        if x_values:
            ticks = sorted(int(v) for v in x_values)
            ax.set_xticks(ticks, [str(v) for v in ticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        fixed_text = ", ".join(str(int(v)) for v in sorted(fixed_values))
        ax.set_title(f"{fixed_name} = {fixed_text}" if fixed_text else xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("time per update / reinforce (ratio)")
    axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("How the overhead grows (dashed line: parity; faint crosses: counted FLOPs)")
    fig.tight_layout()
    return fig


def make_figures(
    metrics: pd.DataFrame, out_dir: str | Path, overhead: pd.DataFrame | None = None,
    scaling: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Draw every figure into ``out_dir``; returns name -> PNG path (a PDF sits beside each)."""
    out_dir = Path(out_dir)
    names = set(metrics["algorithm"]) | (set(overhead["mode"]) if overhead is not None else set())
    names |= set(scaling["mode"]) if scaling is not None else set()
    colors = algorithm_colors(names)
    written = {}
    for name, (column, ylabel, title, scale, log_y) in CURVES.items():
        fig = plot_curve(metrics, column, ylabel, title, colors, scale, log_y)
        if fig is not None:
            written[name] = save_figure(fig, out_dir / name)[0]
    if overhead is not None:
        fig = plot_overhead(overhead, colors)
        if fig is not None:
            written["overhead"] = save_figure(fig, out_dir / "overhead")[0]
    if scaling is not None:
        fig = plot_scaling(scaling, colors)
        if fig is not None:
            written["overhead_scaling"] = save_figure(fig, out_dir / "overhead_scaling")[0]
    return written
