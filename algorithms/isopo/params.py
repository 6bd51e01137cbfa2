"""Parameters that are not nn.Linear weights (norm gains, embeddings, ...) take the REINFORCE gradient.

The backward pass carries the advantage-free δ. Sequences do not interact, so the REINFORCE signal at any
token is A_{s(t)} δ_t; a module's parameters get it by running the module twice in the forward pass: once
with frozen parameters (the path the input gradient takes) and once on detached inputs with the output
gradient scaled per token (the path the parameter gradient takes). The output value is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

if TYPE_CHECKING:
    from .batch import MicroBatch


class TokenGradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient at token t by scale[t]."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        shape = scale.shape + (1,) * (grad.dim() - scale.dim())
        return grad * scale.view(shape).to(grad.dtype), None


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _needs_grad(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


class ReinforceParamsForward:
    """Replacement forward of a module that owns parameters but is not an nn.Linear."""

    def __init__(self, module: torch.nn.Module, original: Callable, active: Callable[[], MicroBatch | None]):
        self.module = module
        self.original = original
        self.active = active
        self._reentered = False

    def __call__(self, *args, **kwargs):
        mb = self.active()
        if mb is None or self._reentered or not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        scale = mb.token_adv.view(mb.seq_ids.shape)
        params = dict(self.module.named_parameters(recurse=False))
        inputs_need_grad = any(_needs_grad(v) for v in list(args) + list(kwargs.values()))
        self._reentered = True  # functional_call goes through module.__call__, i.e. back into this method
        try:
            param_path = functional_call(
                self.module, params, tree_map(_detach, args), tree_map(_detach, kwargs), tie_weights=False
            )
            if not isinstance(param_path, torch.Tensor) or param_path.shape[: scale.dim()] != scale.shape:
                raise RuntimeError(
                    f"ISOPO: {type(self.module).__name__} must return one tensor whose shape starts with the "
                    f"micro-batch's token layout {tuple(scale.shape)}"
                )
            if not inputs_need_grad:
                return TokenGradScale.apply(param_path, scale)
            input_path = functional_call(
                self.module, {k: p.detach() for k, p in params.items()}, args, kwargs, tie_weights=False
            )
        finally:
            self._reentered = False
        return input_path + (TokenGradScale.apply(param_path, scale) - param_path.detach())
