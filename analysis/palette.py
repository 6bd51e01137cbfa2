"""Algorithm order and colours shared by every table and figure, so one algorithm always looks the same."""

from __future__ import annotations

from collections.abc import Iterable

# Baselines first, then the methods compared against them.
KNOWN_ALGORITHMS = ("reinforce", "ppo", "grpo", "dr_grpo", "cispo", "isopo_ni", "isopo_int")

# matplotlib's tab10, chosen so the two ISOPO variants get the most salient colours (red, purple).
_FIXED = {
    "reinforce": "#7f7f7f",
    "ppo": "#1f77b4",
    "grpo": "#2ca02c",
    "dr_grpo": "#17becf",
    "cispo": "#ff7f0e",
    "isopo_ni": "#d62728",
    "isopo_int": "#9467bd",
}
# Unknown names cycle through colours that do not clash with the fixed ones (tab20's light shades etc.).
_FALLBACK = ("#8c564b", "#e377c2", "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
             "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79", "#637939")


def order_algorithms(names: Iterable[str]) -> list[str]:
    """Known algorithms in their fixed order, then any others alphabetically."""
    names = set(names)
    known = [a for a in KNOWN_ALGORITHMS if a in names]
    return known + sorted(names - set(known))


def algorithm_colors(names: Iterable[str]) -> dict[str, str]:
    """Colour per name: fixed for known names; others take the fallback cycle in alphabetical order.

    Pass the full set of names of a report so unknown names keep their colour across its figures.
    """
    colors = {}
    unknown = sorted(n for n in set(names) if n not in _FIXED)
    for name in set(names):
        if name in _FIXED:
            colors[name] = _FIXED[name]
    for i, name in enumerate(unknown):
        colors[name] = _FALLBACK[i % len(_FALLBACK)]
    return colors
