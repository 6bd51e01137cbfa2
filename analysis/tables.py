"""Render tables as Markdown (for report.md) and write them as CSV and LaTeX under tables/."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.atomic import atomic_write_text


def format_value(value: object) -> str:
    """Four significant digits for floats, an en dash for missing values, str() for the rest."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' to_markdown needs tabulate, which we do not depend on)."""
    def cell(v: object) -> str:
        return format_value(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    align = "| " + " | ".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join([header, align, *body])


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs tabular via pandas (needs jinja2)."""
    return df.to_latex(index=False, escape=True, na_rep="--", float_format=lambda v: f"{v:.4g}")


def write_table(df: pd.DataFrame, tables_dir: str | Path, name: str) -> dict[str, Path]:
    """Write ``name``.csv (full precision) and ``name``.tex; a missing jinja2 skips only the .tex."""
    tables_dir = Path(tables_dir)
    written = {"csv": atomic_write_text(tables_dir / f"{name}.csv", df.to_csv(index=False))}
    try:
        latex = to_latex(df)
    except ImportError:
        return written
    written["tex"] = atomic_write_text(tables_dir / f"{name}.tex", latex)
    return written
