"""Statistics and reports for isopo-bench sweeps (see ``python -m analysis report --help``)."""

from analysis.errors import ResultsError

__all__ = ["ResultsError", "load_sweep", "write_report"]


def __getattr__(name: str):
    # Lazy so that `import analysis.stats` does not pull in matplotlib through the report module.
    if name == "write_report":
        from analysis.report import write_report

        return write_report
    if name == "load_sweep":
        from analysis.load import load_sweep

        return load_sweep
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
