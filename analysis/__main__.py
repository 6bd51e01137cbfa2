"""Command line: ``python -m analysis report results/<sweep> [--overhead-dir results/overhead]``."""

from __future__ import annotations

import argparse
import sys

from analysis.errors import ResultsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Statistics and reports for isopo-bench sweeps.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = sub.add_parser(
        "report",
        help="write results/<sweep>/report.md with tables and figures",
        description="Analyse a sweep directory and write report.md, tables/ (CSV, LaTeX) and "
                    "figures/ (PNG, PDF) into it.",
    )
    rep.add_argument("sweep_dir", help="sweep directory holding metrics.parquet, runs.csv and config.yaml")
    rep.add_argument("--overhead-dir", default=None,
                     help="folder of `python -m bench overhead --json` files "
                          "(default: the sweep's sibling overhead/ folder if it exists)")
    rep.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for CIs (default 2000)")
    rep.add_argument("--seed", type=int, default=0, help="random seed for the bootstrap (default 0)")
    rep.add_argument("--spike-k", type=float, default=5.0,
                     help="gradient-norm spike threshold as a multiple of the running median (default 5)")
    rep.add_argument("--collapse-margin", type=float, default=0.1,
                     help="accuracy drop below a run's best, as a fraction, that counts as collapse "
                          "(default 0.1)")
    rep.add_argument("--entropy-fraction", type=float, default=0.1,
                     help="final/initial entropy ratio below which entropy has collapsed (default 0.1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so `--help` and argument errors stay fast (no matplotlib/scipy import).
    from analysis.report import write_report

    try:
        path = write_report(args.sweep_dir, args.overhead_dir, n_boot=args.n_boot, seed=args.seed,
                            spike_k=args.spike_k, collapse_margin=args.collapse_margin,
                            entropy_fraction=args.entropy_fraction)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unwritable results folder: still one line, no traceback
        print(f"error: cannot write the report: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
