"""Command line: `python -m bench run [--config FILE] [key=value ...]` and `python -m bench overhead ...`."""

from __future__ import annotations

import argparse
import os
import sys

from .config import DEFAULT_CONFIG


def _known_errors() -> tuple[type[BaseException], ...]:
    from algorithms import UnknownNameError
    from tasks import DataError

    from .config import ConfigError
    from .models import ModelPathError
    from .sweep import SweepFailed

    return (ConfigError, UnknownNameError, DataError, ModelPathError, FileNotFoundError, SweepFailed, ValueError)


def main(argv: list[str] | None = None) -> int:
    # Library chatter (MLflow's INFO lines, weight-loading bars) would drown the sweep's own progress.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="python -m bench", description="isopo-bench: controlled comparisons of "
                                     "policy-gradient algorithms for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run a sweep (algorithms × seeds) and write its tables and report",
        description="Run a sweep: every algorithm × seed through the same rollout harness. Re-running the same "
        "command resumes it. Overrides are OmegaConf key=value pairs, e.g. run.steps=50 sweep.seeds=[0,1] "
        "sweep.algorithms=[grpo,isopo_ni] run.algorithm.mini_batches=1.",
    )
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the embedded default)")
    run.add_argument("overrides", nargs="*", help="key=value overrides")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            return _run(args)
    except _known_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def _run(args) -> int:
    from .config import load_config, to_yaml
    from .sweep import run_sweep, sweep_dir

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    out = run_sweep(cfg)
    print(f"sweep tables: {sweep_dir(cfg)}/metrics.parquet, metrics.csv, runs.csv")
    if cfg.sweep.report:
        from analysis import write_report

        report = write_report(out)
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
