"""Micro-benchmarks of ISOPO's host cost: what each linear layer adds to the host's work in one update
step, where the step's arithmetic is negligible — the part of a GPU step that the host, not the device, pays
(on an H100 with the layer tails as CUDA graphs, ISOPO's steps are host-bound: BENCHMARKS.md).

A stack of LAYERS tiny bias-free nn.Linear layers (B=8 sequences of T=4 tokens, width 32), one forward and
backward under bf16 autocast (and ``end_step``), timed whole: plain autograd, ISOPO's eager layers, and
ISOPO's graphed path with the replay's own cost left out — the tails run on a shape's static buffers
(``TailGraphs(capture=False)``) once, and later calls hand back those outputs as a replay would; a replay's
launch is a CUDA driver call that only a GPU can time (``cudaGraphLaunch`` in ``bench overhead --profile``).
Divide the difference to ``plain`` by LAYERS for the host's extra µs per layer. ``test_norm_stack_step``
does the same for LAYERS Qwen3 RMSNorms (their gains take ISOPO's REINFORCE gradient through a per-token
expansion, ``params.PerTokenParam``; Qwen3-0.6B runs 113 norms a step beside its 197 linear layers).
``test_micro_batch_bookkeeping`` times what one micro-batch costs the host once, at Qwen3-0.6B's step: its
token layouts and every layer's overlap sample. Not part of the default test run; run with

    .venv/bin/python -m pytest bench/test_bench_isopo_host.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from algorithms.isopo import Isopo, IsopoConfig
from algorithms.isopo.graphs import TailGraph, TailGraphs

LAYERS, B, T, WIDTH = 100, 8, 4, 32
VARIANTS = {
    "plain": None,
    "isopo_ni": IsopoConfig(variant="non_interacting", setting="paper", num_samples=16, strategy="instantiate"),
    "isopo_int": IsopoConfig(variant="interacting", setting=None, strategy="instantiate"),
}


def _replay_free(self, tail, capture):
    """TailGraph._replay as a replay behaves, minus the launch: the first call runs the tail on the static
    buffers, later calls return the same outputs."""
    if self.outputs is None:
        self.outputs = self._call(tail)
    return self.outputs


CASES = [("plain", "eager")] + [(variant, path) for variant in ("isopo_ni", "isopo_int") for path in ("eager", "graph")]


def _time_stack(benchmark, model: nn.Module, engine: Isopo | None, group: str) -> None:
    """Time one forward, backward (and ``end_step``) of ``model`` over B × T tokens under bf16 autocast, ISOPO
    installed when ``engine`` is given; then check every parameter got a finite gradient."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, WIDTH, generator=gen).requires_grad_()
    seq_ids = torch.arange(B).unsqueeze(1).expand(B, T).contiguous()
    advantages = torch.randn(B, generator=gen)

    def step():
        model.zero_grad(set_to_none=True)
        if engine is None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()
            return
        with engine.micro_batch(seq_ids, advantages):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().sum().backward()
        engine.end_step()

    if engine is not None:
        engine.install()
    try:
        benchmark.group = group
        benchmark.extra_info["layers"] = LAYERS
        benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=3)
    finally:
        if engine is not None:
            engine.remove()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("variant", "path"), CASES, ids=[f"{v}-{p}" for v, p in CASES])
def test_layer_stack_step(benchmark, monkeypatch, variant, path):
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])
    engine = None
    if cfg is not None:
        engine = Isopo(model, cfg.replace(cuda_graphs=path == "graph"))
        if path == "graph":
            monkeypatch.setattr(TailGraph, "_replay", _replay_free)
            engine.graphs = TailGraphs(capture=False)
            for layer in engine.layers:
                layer.graphs = engine.graphs
    _time_stack(benchmark, model, engine, f"host cost, {LAYERS} linear layers")
    if path == "graph":
        assert len(engine.graphs) > 0 and not engine.graphs.failed


@pytest.mark.parametrize("variant", ["plain", "isopo_int"])
def test_norm_stack_step(benchmark, variant):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    # Norms alone, but the engine needs a linear layer to install: a last one closes the stack.
    model = nn.Sequential(*[Qwen3RMSNorm(WIDTH) for _ in range(LAYERS)], nn.Linear(WIDTH, WIDTH, bias=False))
    engine = Isopo(model, VARIANTS[variant].replace(cuda_graphs=False)) if variant != "plain" else None
    _time_stack(benchmark, model, engine, f"host cost, {LAYERS} RMSNorms")


def test_micro_batch_bookkeeping(benchmark):
    """What an ISOPO micro-batch costs the host before and at its first layer's backward, at Qwen3-0.6B's
    step (B=8, T=1024, 197 linear layers, K=250, the LM head on the 513 response columns): the token layout,
    the LM head's view, every layer's overlap sample drawn and mapped into the view, and both layouts'
    samples handed to the device (here the CPU)."""
    from algorithms.isopo import MicroBatch

    b, t, n_layers, first = 8, 1024, 197, 511
    seq_ids = torch.arange(b).unsqueeze(1).expand(b, t).contiguous()
    advantages = torch.randn(b, generator=torch.Generator().manual_seed(0))
    view = torch.arange(b * t).view(b, t)[:, first:]
    index = iter(range(10**9))

    def bookkeeping():
        mb = MicroBatch.build(seq_ids, advantages, n_layers=n_layers, k=250, seed=0, step=0, index=next(index),
                              dtype=torch.float32)
        layout = mb.add_view(view)
        return layout.samples[n_layers - 1], mb.main.samples[0]

    benchmark.group = "host cost, one micro-batch's bookkeeping"
    view_rows, main_rows = benchmark.pedantic(bookkeeping, rounds=30, iterations=1, warmup_rounds=3)
    assert main_rows.numel() == 250 and 0 < view_rows.numel() < 250
