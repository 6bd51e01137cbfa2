"""Overhead tables from ``python -m bench overhead --json`` files (already parsed by load_overhead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

BASE_MODE = "reinforce"
COLUMNS = ["group", "device", "date", "source", "model", "batch", "seq_len", "lm_head", "compile", "cuda_graphs", "triton_kernels", "mode",
           "median_s", "min_s", "max_s", "host_s", "time_ratio", "paired_ratio", "paired_lo", "paired_hi", "flop_ratio",
           "peak_mib", "mem_ratio"]
SCALING_COLUMNS = ["group", "device", "date", "source", "model", "lm_head", "compile", "cuda_graphs", "triton_kernels", "fixed_batch",
                   "fixed_seq_len",
                   "batch", "seq_len", "mode", "median_s", "time_ratio", "paired_ratio", "flop_ratio", "mem_ratio"]


def overhead_table(docs: list[dict]) -> pd.DataFrame:
    """One row per (file, mode): timings, peak memory and their ratios to ``reinforce`` in the same file.

    ``host_s`` is the median time until the host had issued the step (NaN in files from before it was
    measured): on CUDA, host_s close to median_s means launching kernels, not running them, set the pace.
    ``paired_lo`` / ``paired_hi``: the paired ratio's 95 % CI (NaN in older files and below 6 rounds).
    ``flop_ratio``: the step's counted FLOPs over reinforce's (``bench.flops``); on a CPU, time_ratio's floor.
    A ratio missing from the JSON is recomputed from the file's reinforce entry (NaN without one).
    ``group`` labels one device/config (one file) for grouping bars.
    """
    rows = []
    for doc in docs:
        facts, config = _file_facts(doc)
        # A scaling file's "results" are those of one of its points.
        point = doc.get("results_point") if isinstance(doc.get("results_point"), dict) else {}
        shape = {"batch": point.get("batch", config.get("batch")),
                 "seq_len": point.get("seq_len", config.get("seq_len"))}
        results = doc["results"]
        for mode, res in results.items():
            rows.append({**facts, **shape, "mode": mode, "median_s": float(res["median_s"]),
                         "min_s": float(res["min_s"]), "max_s": float(res["max_s"]),
                         "host_s": float(res.get("host_median_s", np.nan)),
                         "peak_mib": float(res["peak_mib"]), **_ratios(res, results), **_paired_ci(res)})
    return pd.DataFrame(rows, columns=COLUMNS)


def scaling_table(docs: list[dict]) -> pd.DataFrame:
    """One row per (scaling file, point, mode) of ``python -m bench overhead --scaling`` files.

    ``fixed_batch`` / ``fixed_seq_len`` are the sweep's --batch and --seq-len: the T sweep is the rows with
    batch == fixed_batch, the B sweep those with seq_len == fixed_seq_len (the shared point is in both).
    Files without ``points`` (single measurements) add nothing.
    """
    rows = []
    for doc in docs:
        points = doc.get("points")
        if not isinstance(points, list):
            continue
        facts, config = _file_facts(doc)
        fixed = {"fixed_batch": config.get("batch"), "fixed_seq_len": config.get("seq_len")}
        for point in points:
            results = point["results"]
            for mode, res in results.items():
                rows.append({**facts, **fixed, "batch": int(point["batch"]), "seq_len": int(point["seq_len"]),
                             "mode": mode, "median_s": float(res["median_s"]), **_ratios(res, results)})
    return pd.DataFrame(rows, columns=SCALING_COLUMNS)


def _file_facts(doc: dict) -> tuple[dict, dict]:
    """The columns every row of one file shares, and the file's config (empty when absent or malformed)."""
    config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    source = str(doc.get("source", ""))
    facts = {
        "group": f"{doc['device']} ({Path(source).stem})" if source else str(doc["device"]),
        "device": str(doc["device"]), "date": str(doc["date"]), "source": source,
        "model": config.get("model"),
        "lm_head": config.get("lm_head", "all"),  # files written before the option: every position
        "compile": bool(config.get("compile", False)),  # ISOPO's layers through torch.compile
        "cuda_graphs": bool(config.get("cuda_graphs", False)),  # ISOPO's layer tails replayed as CUDA graphs
        # The Triton kernels for G's Gram matrix and weighted sum (files from before them: cuBLAS).
        "triton_kernels": bool(config.get("triton_kernels", False)),
    }
    return facts, config


def _ratios(res: dict, results: dict) -> dict:
    base = results.get(BASE_MODE, {})
    return {
        "time_ratio": _ratio(res, base, "ratio_vs_reinforce", "median_s"),
        # Median of per-round ratios; absent from files written before it existed.
        "paired_ratio": float(res.get("paired_ratio_median", np.nan)),
        # The step's counted FLOPs over reinforce's (NaN in files from before it was counted).
        "flop_ratio": _ratio(res, base, "flop_ratio_vs_reinforce", "gflop"),
        "mem_ratio": _ratio(res, base, "peak_ratio_vs_reinforce", "peak_mib"),
    }


def _paired_ci(res: dict) -> dict:
    ci = res.get("paired_ratio_ci95")
    lo, hi = (ci if isinstance(ci, list) and len(ci) == 2 else (np.nan, np.nan))
    return {"paired_lo": float(lo), "paired_hi": float(hi)}


def _ratio(res: dict, base: dict, key: str, raw: str) -> float:
    if res.get(key) is not None:
        return float(res[key])
    if base.get(raw) and res.get(raw) is not None:
        return float(res[raw]) / float(base[raw])
    return np.nan
