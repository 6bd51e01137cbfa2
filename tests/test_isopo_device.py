"""ISOPO on every device this machine has (CPU always, CUDA when present) against the float64 reference on
the same device and on the CPU (within the model's own cross-device difference), and under bf16 autocast on
that device. On a GPU host, `pytest tests/test_isopo_device.py` is the check to run next to
`python -m bench overhead --device cuda`."""

from __future__ import annotations

import functools

import pytest
import torch
from isopo_fixtures import masked_sum, tiny_qwen3, token_log_probs
from test_isopo import (
    SAME_B_STEPS,
    _reinforce_grads,
    assert_rel_close,
    efficient_step,
    reference_step,
    response_tokens,
    step_batches,
)

from algorithms.isopo import Isopo, IsopoConfig
from algorithms.isopo.reference import ReferenceIsopo

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CONFIGS = {
    "paper-K9": IsopoConfig(setting="paper", c_o=0.3, num_samples=9, seed=1),
    "paper-gram": IsopoConfig(setting="paper", num_samples=9, strategy="gram"),
    "interacting": IsopoConfig(variant="interacting", setting=None, c_lambda=0.5),
}


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_isopo_on_the_device_matches_the_float64_reference(device, name):
    """First against the reference on the same device (1e-8): only ISOPO's own arithmetic can separate the
    two there. Then against the reference on the CPU: the model's own float32 internals (rotary angles, the
    norms' upcast) differ between CPU and CUDA kernels by an ulp, ~1e-7 in a gradient, so ISOPO may differ by
    no more than the plain REINFORCE gradient of the same model does between the two devices, with room 100×
    (ISOPO's weights are powers of its statistics); on the CPU that difference is zero."""
    cfg = CONFIGS[name]
    cpu_batches = step_batches(1)
    batches = [_on(b, device) for b in cpu_batches]
    n_tok = response_tokens(batches)
    model = tiny_qwen3().to(device)
    engine_layers = len(Isopo(model, cfg).layers)
    expected = reference_step(model, ReferenceIsopo(model, cfg), batches, n_tok, 0, engine_layers,
                              cfg.num_samples, cfg.seed)
    grads = efficient_step(model, Isopo(model, cfg), batches, n_tok)
    assert all(g.device.type == device for g in grads.values())
    grads = {k: v.cpu() for k, v in grads.items()}
    assert_rel_close(grads, {k: v.cpu() for k, v in expected.items()})

    cpu_model = tiny_qwen3()
    cpu_expected = reference_step(cpu_model, ReferenceIsopo(cpu_model, cfg), cpu_batches, n_tok, 0, engine_layers,
                                  cfg.num_samples, cfg.seed)
    plain_here, plain_cpu = _reinforce_grads(model, batches, n_tok), _reinforce_grads(cpu_model, cpu_batches, n_tok)
    for param, ref in cpu_expected.items():
        floor = float((plain_here[param].cpu() - plain_cpu[param]).norm() / plain_cpu[param].norm())
        err = float((grads[param] - ref).norm() / ref.norm())
        assert err <= max(100 * floor, 1e-10), f"{param}: {err:.2e} against the model's own {floor:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["non_interacting", "interacting"])
@pytest.mark.parametrize("strategy", ["auto", "gram"])
def test_bf16_autocast_on_the_device_stays_close_to_float32(device, variant, strategy):
    """bf16 compute, float32 statistics and weights: the path CUDA runs take (the Gram route's, on CUDA, with
    bf16 operands straight into float32-output matmuls)."""
    cfg = IsopoConfig(variant=variant, setting="paper", num_samples=9, strategy=strategy)
    batches = [_on(b, device) for b in step_batches(0)]
    n_tok = response_tokens(batches)
    model = tiny_qwen3(dtype=torch.float32).to(device)
    exact = efficient_step(model, Isopo(model, cfg), batches, n_tok)
    engine = Isopo(model, cfg)
    model.zero_grad(set_to_none=True)
    with engine.installed():
        for b in batches:
            with engine.micro_batch(b["seq_ids"], b["advantages"]):
                with torch.autocast(device, dtype=torch.bfloat16):
                    logp = token_log_probs(model, b["input_ids"], b["attention_mask"])
                (-masked_sum(logp, b["response_mask"]) / n_tok).backward()
    engine.end_step()
    errors = {n: float((p.grad - exact[n]).norm() / exact[n].norm()) for n, p in model.named_parameters()}
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert max(errors.values()) < 0.1, errors
    assert max(errors.values()) > 1e-4  # bf16 really was used: float32 alone would agree to ~1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_graph_tails_on_the_device_match_the_eager_layers(device):
    """IsopoConfig.cuda_graphs (on by default; turned off here for the eager side): on CUDA every unchunked
    layer's tail is captured once per shape and replayed; on the CPU the same static buffers are used without
    a capture. Three float64 steps of two equal-B padded micro-batches (a shape's graph meets new advantages;
    the EMAs change between steps, and the third reads them from the graphs' slots as the second's end
    refreshed them): the same gradients as the eager layers; and one float32 step under bf16
    autocast, the benchmark's path (bf16 G, float32 statistics), where the two run the same kernels."""
    for cfg in (IsopoConfig(setting="rel_overlap", c_n=0.5, c_o=0.3, c_r=0.2, num_samples=9, seed=3,
                            strategy="instantiate"),
                IsopoConfig(variant="interacting", setting=None, c_lambda=0.5, strategy="instantiate")):
        model = tiny_qwen3().to(device)
        eager, graphed = Isopo(model, cfg.replace(cuda_graphs=False)), Isopo(model, cfg.replace(cuda_graphs=True))
        graphed.graphs.capture = device == "cuda"
        for step in range(len(SAME_B_STEPS)):
            batches = [_on(b, device) for b in step_batches(step, SAME_B_STEPS)]
            n_tok = response_tokens(batches)
            expected = efficient_step(model, eager, batches, n_tok)
            assert_rel_close(efficient_step(model, graphed, batches, n_tok), expected)
        model = tiny_qwen3(dtype=torch.float32).to(device)
        eager, graphed = Isopo(model, cfg.replace(cuda_graphs=False)), Isopo(model, cfg.replace(cuda_graphs=True))
        graphed.graphs.capture = device == "cuda"
        batches = [_on(b, device) for b in step_batches(0, SAME_B_STEPS)]
        bf16 = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
        expected = efficient_step(model, eager, batches, response_tokens(batches), autocast=bf16)
        got = efficient_step(model, graphed, batches, response_tokens(batches), autocast=bf16)
        assert_rel_close(got, expected, tol=1e-5)
        assert any(t.g.dtype == torch.bfloat16 for t in graphed.graphs._graphs.values())
        tails = list(graphed.graphs._graphs.values())
        assert tails and not graphed.graphs.failed
        assert all((t.graph is not None) == (device == "cuda") for t in tails)
