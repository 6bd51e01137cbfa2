"""Micro-benchmarks: the backward of one nn.Linear under ISOPO's autograd function
(``algorithms/isopo/linear.py``) against the plain nn.Linear backward, at a few (B, T, in, out) shapes.

Not part of the default test run (testpaths = tests, and addopts disables benchmarks). Run with

    .venv/bin/python -m pytest bench/test_bench_isopo_linear.py --benchmark-enable

Each round runs the forward in pytest-benchmark's untimed ``setup`` and times only the backward
(``out.backward(grad)``: the input gradient, the weight gradient and, under ISOPO, the per-sequence
statistics and weights). One torch thread; a few rounds per case. Cases of one shape share a benchmark
group, so the table compares them directly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from algorithms.isopo import Isopo, IsopoConfig

SHAPES = [(8, 256, 256, 256), (8, 1024, 256, 768), (4, 512, 512, 4096)]
VARIANTS = {
    "plain": None,
    "isopo_ni": IsopoConfig(variant="non_interacting", setting="paper"),
    "isopo_int": IsopoConfig(variant="interacting", setting=None),
}


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-{}x{}".format(*s))
def test_linear_backward(benchmark, shape, variant):
    b, t, d_in, d_out = shape
    gen = torch.Generator().manual_seed(0)
    module = OneLinear(d_in, d_out)
    x = torch.randn(b, t, d_in, generator=gen).requires_grad_()
    grad = torch.randn(b, t, d_out, generator=gen)
    seq_ids = torch.arange(b).unsqueeze(1).expand(b, t)
    advantages = torch.randn(b, generator=gen)
    cfg = VARIANTS[variant]
    engine = Isopo(module, cfg) if cfg is not None else None

    def setup():
        module.zero_grad(set_to_none=True)
        x.grad = None
        if engine is None:
            out = module(x)
        else:
            with engine.installed(), engine.micro_batch(seq_ids, advantages):
                out = module(x)  # the autograd node keeps the micro-batch: backward may run after the block
        return (out,), {}

    def backward(out):
        out.backward(grad)

    benchmark.group = "linear backward B{} T{} {}x{}".format(*shape)
    benchmark.extra_info["shape"] = list(shape)
    benchmark.pedantic(backward, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    assert module.proj.weight.grad is not None and torch.isfinite(module.proj.weight.grad).all()
    assert x.grad is not None
