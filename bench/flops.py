"""The floating-point operations of one update step, counted by ``torch.utils.flop_counter``.

ISOPO's overhead has a floor counted in FLOPs: its per-sequence gradients replace the weight-gradient matmul
at equal cost, and only its statistics (the overlap's K sampled tokens, the B × B NTK, the weighted sum) and,
where a layer's G is formed in blocks, a second weight-gradient matmul add work. Counting the FLOPs that each
mode's step really issues turns that floor into a number measured beside the times: on a CPU, where the
matmuls set the pace, a mode whose time ratio sits at its FLOP ratio has nothing left to gain but FLOPs.

PyTorch's counter covers the matmuls (mm, bmm, addmm, baddbmm, convolutions) and the fused attention
kernels; elementwise work and reductions count nothing, which is what a floor should leave out. Two gaps of
its attention formulas are closed here for every mode alike: the CPU's flash attention is not in its
registry (it would count zero), and it counts a causal mask as the full T × T product, twice the work the
kernels do (torch's own note says so). The attention operators are therefore counted here from torch's
formulas, scaled by the share of (query, key) pairs that a causal mask keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

_ATTENTION_OPS = {
    # operator: whether it is a backward (its operands start with the output's gradient)
    "_scaled_dot_product_flash_attention_for_cpu": False,
    "_scaled_dot_product_flash_attention_for_cpu_backward": True,
    "_scaled_dot_product_flash_attention": False,
    "_scaled_dot_product_flash_attention_backward": True,
    "_scaled_dot_product_efficient_attention": False,
    "_scaled_dot_product_efficient_attention_backward": True,
    "_scaled_dot_product_cudnn_attention": False,
    "_scaled_dot_product_cudnn_attention_backward": True,
}


def causal_fraction(q_len: int, k_len: int) -> float:
    """The share of the q_len × k_len (query, key) pairs that a causal mask keeps (top-left aligned, as
    ``scaled_dot_product_attention``'s ``is_causal``): query i sees keys 0..i."""
    full = min(q_len, k_len)
    kept = full * (full + 1) // 2 + (q_len - full) * k_len
    return kept / (q_len * k_len)


def _attention_formula(op: torch._ops.OpOverloadPacket, backward: bool) -> Callable[..., int]:
    names = [a.name for a in op.default._schema.arguments]
    causal_at = names.index("is_causal")
    first = 1 if backward else 0  # query, key, value follow the output's gradient in a backward

    def count(*args, out_val=None, **kwargs) -> int:
        causal = kwargs.get("is_causal", args[causal_at] if len(args) > causal_at else False)
        query, key, value = (t.shape for t in args[first:first + 3])
        flops = (sdpa_backward_flop_count(args[0].shape, query, key, value) if backward
                 else sdpa_flop_count(query, key, value))
        return round(flops * causal_fraction(query[-2], key[-2])) if causal else flops

    count._get_raw = True  # FlopCounterMode then passes the tensors themselves, not their shapes
    return count


ATTENTION_FORMULAS = {getattr(aten, name): _attention_formula(getattr(aten, name), backward)
                      for name, backward in _ATTENTION_OPS.items() if hasattr(aten, name)}


def count_flops(step: Callable[[], object]) -> int:
    """The FLOPs that ``step()`` issues through PyTorch's dispatcher (forward, backward, and whatever a
    custom autograd function runs inside the backward). Work outside the dispatcher — a replayed CUDA graph,
    a Triton kernel, a torch.compile'd region — is not seen, so count a step that runs the torch path."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
        step()
    return counter.get_total_flops()
