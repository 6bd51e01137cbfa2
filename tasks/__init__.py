"""Tasks: sources of problems with a verifiable reward, looked up by name.

Importing the package registers every built-in task; ``get_task("gsm8k", strict=True)`` builds one.
"""

from __future__ import annotations

import inspect
from typing import Any

from algorithms.registry import UnknownNameError
from tasks import arith, gsm8k
from tasks.base import TASKS, DataError, Example, Task, register_task

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "Task",
    "UnknownNameError",
    "arith",
    "get_task",
    "gsm8k",
    "register_task",
]


def get_task(name: str, **options: Any) -> Task:
    """The task registered as ``name``, built with ``options``.

    An unknown name raises UnknownNameError listing the valid names; an unknown option raises TypeError
    listing the task's options.
    """
    cls = TASKS.get(name)
    params = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise TypeError(
            f"task {name!r} has no option(s) {', '.join(unknown)}; valid options: {', '.join(accepted)}"
        )
    return cls(**options)
