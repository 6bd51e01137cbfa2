"""Calling this package's autograd functions without ``torch.autograd.Function.apply``'s Python wrapper.

ISOPO runs one custom function per linear layer and per norm gain, ~300 per forward pass, and on a GPU the
host's time per layer is what the step waits on (BENCHMARKS.md). The public ``apply`` first binds
arguments for ``setup_context`` and unwraps functorch wrappers — work for functorch transforms, which these
functions do not support anyway (they define no ``setup_context``, so under vmap/grad ``apply`` raises) —
~7 µs a call on a CPU core. The C++ ``apply`` underneath does the autograd work itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def direct_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function.apply`` minus the Python wrapper, where this torch has the C++ one (else the public one)."""
    base = getattr(torch._C, "_FunctionBase", None)
    if base is None or not hasattr(base, "apply"):
        return function.apply
    return super(torch.autograd.Function, function).apply
