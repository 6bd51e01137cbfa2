"""Parameters that are not nn.Linear weights (norm gains, embeddings, ...) take the REINFORCE gradient.

The backward pass carries the advantage-free δ. Sequences do not interact, so the REINFORCE signal at any
token is A_{s(t)} δ_t. Two ways to give a module's parameters that signal without touching its input gradient:

- Gains (an RMSNorm's ``weight * normalised(x)``): the gain enters the forward expanded to one copy per
  token, a stride-0 view that costs no memory; its backward contracts the per-token gradients with A_{s(t)}
  (one matrix-vector product). One forward, the module's own, with the expanded gain swapped in.
- Anything else (embeddings, LayerNorm with a bias, ...): the module runs twice in the forward pass, once
  with frozen parameters (the path the input gradient takes) and once on detached inputs with the output
  gradient scaled per token (the path the parameter gradient takes). The output value is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .autograd import direct_apply

if TYPE_CHECKING:
    from .batch import MicroBatch, TokenLayout


def is_gain_module(module: torch.nn.Module) -> bool:
    """An RMSNorm in the transformers style: one 1-D ``weight`` that multiplies the normalised input
    elementwise (``variance_epsilon`` marks the family: Llama, Qwen, Mistral, ...)."""
    params = dict(module.named_parameters(recurse=False))
    return (
        list(params) == ["weight"] and params["weight"].dim() == 1 and hasattr(module, "variance_epsilon")
    )


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


class PerTokenParam(torch.autograd.Function):
    """Forward: the parameter expanded to ``shape`` (no copy). Backward: Σ_t token_adv[t] · grad[t], the
    per-token gradients (leading dimensions = the layout, then any per-head dimensions) contracted with
    the advantages."""

    @staticmethod
    def forward(ctx, param, token_adv, shape):
        ctx.save_for_backward(token_adv)
        return param.expand(shape)

    @staticmethod
    def backward(ctx, grad):
        (token_adv,) = ctx.saved_tensors
        per_token = grad.reshape(token_adv.numel(), -1)
        if token_adv.dtype != per_token.dtype:
            token_adv = token_adv.to(per_token.dtype)
        summed = token_adv @ per_token
        if summed.numel() != grad.shape[-1]:  # per-head gains (q_norm, k_norm): sum over the heads too
            summed = summed.view(-1, grad.shape[-1]).sum(0)
        return summed, None, None


apply_per_token_param = direct_apply(PerTokenParam)


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _needs_grad(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


class _Replacement:
    """A module's replacement forward: the original one when no micro-batch is active."""

    def __init__(self, module: torch.nn.Module, original: Callable, active: Callable[[], MicroBatch | None]):
        self.module = module
        self.original = original
        self.active = active
        self._reentered = False

    def __call__(self, *args, **kwargs):
        mb = self.active()
        if mb is None or self._reentered or not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        self._reentered = True  # functional_call goes through module.__call__, i.e. back into this method
        try:
            return self.reinforce_forward(mb, args, kwargs)
        finally:
            self._reentered = False

    def _layout(self, mb: MicroBatch, shape: torch.Size) -> TokenLayout:
        layout = mb.layout_prefix_of(shape)
        if layout is None:
            raise RuntimeError(
                f"ISOPO: {type(self.module).__name__} works on a tensor of shape {tuple(shape)} that starts "
                f"with none of the micro-batch's token layouts ({mb.layout_shapes()})"
            )
        return layout

    def reinforce_forward(self, mb: MicroBatch, args, kwargs):
        raise NotImplementedError


class ReinforceGainForward(_Replacement):
    """One forward with the gain expanded per token (see the module docstring)."""

    def reinforce_forward(self, mb, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        params = self.module._parameters  # nn.Module.__getattr__ costs the host ~1 µs a lookup, per norm
        weight = params["weight"]
        shape = x.shape
        if shape[-1] != weight.shape[0]:
            raise RuntimeError(
                f"ISOPO: {type(self.module).__name__} has a gain of size {weight.numel()} but its input has "
                f"shape {tuple(shape)}"
            )
        layout = self._layout(mb, shape)
        per_token = apply_per_token_param(weight, layout.token_adv, shape)
        # The module's own forward, reading the expanded gain as self.weight for this one call. A plain swap
        # in the parameter dict: functional_call does the same with ~100 µs of bookkeeping, paid by every
        # norm of every layer on the host a GPU step waits for.
        params["weight"] = per_token
        try:
            out = self.original(*args, **kwargs)
        finally:
            params["weight"] = weight
        if not isinstance(out, torch.Tensor) or out.shape != shape:
            raise RuntimeError(f"ISOPO: {type(self.module).__name__} must return one tensor shaped like its input")
        return out


class ReinforceParamsForward(_Replacement):
    """Two forwards, one per gradient path (see the module docstring)."""

    def reinforce_forward(self, mb, args, kwargs):
        params = dict(self.module.named_parameters(recurse=False))
        inputs_need_grad = any(_needs_grad(v) for v in list(args) + list(kwargs.values()))
        param_path = functional_call(
            self.module, params, tree_map(_detach, args), tree_map(_detach, kwargs), tie_weights=False
        )
        if not isinstance(param_path, torch.Tensor):
            raise RuntimeError(f"ISOPO: {type(self.module).__name__} must return one tensor")
        layout = self._layout(mb, param_path.shape)
        scale = layout.token_adv.view(layout.shape)
        if not inputs_need_grad:
            return TokenGradScale.apply(param_path, scale)
        input_path = functional_call(
            self.module, {k: p.detach() for k, p in params.items()}, args, kwargs, tie_weights=False
        )
        return input_path + (TokenGradScale.apply(param_path, scale) - param_path.detach())
