"""ISOPO on every device this machine has (CPU always, CUDA when present) against the CPU float64 reference,
and under bf16 autocast on that device. On a GPU host, `pytest tests/test_isopo_device.py` is the check to run
next to `python -m bench overhead --device cuda`."""

from __future__ import annotations

import pytest
import torch
from isopo_fixtures import masked_sum, tiny_qwen3, token_log_probs
from test_isopo import assert_rel_close, efficient_step, reference_step, response_tokens, step_batches

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
def test_isopo_on_the_device_matches_the_cpu_float64_reference(device, name):
    cfg = CONFIGS[name]
    batches = step_batches(1)
    n_tok = response_tokens(batches)
    cpu_model = tiny_qwen3()
    engine_layers = len(Isopo(cpu_model, cfg).layers)
    expected = reference_step(cpu_model, ReferenceIsopo(cpu_model, cfg), batches, n_tok, 0, engine_layers,
                              cfg.num_samples, cfg.seed)
    model = tiny_qwen3().to(device)  # same seed: the same weights
    grads = efficient_step(model, Isopo(model, cfg), [_on(b, device) for b in batches], n_tok)
    assert all(g.device.type == device for g in grads.values())
    assert_rel_close({k: v.cpu() for k, v in grads.items()}, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["non_interacting", "interacting"])
def test_bf16_autocast_on_the_device_stays_close_to_float32(device, variant):
    """bf16 compute, float32 statistics and weights: the path CUDA runs take."""
    cfg = IsopoConfig(variant=variant, setting="paper", num_samples=9)
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
