"""``bench.flops``: the FLOP counts that `bench overhead` reports beside its times, checked against counts made
by hand — attention on a CPU, a causal mask, and ISOPO's statistics on every route against the cost model
that ``choose_strategy`` picks routes by."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from algorithms.isopo.params import is_gain_module
from analysis.overhead import overhead_table
from bench import overhead
from bench.__main__ import main
from bench.flops import causal_fraction, count_flops


@pytest.mark.parametrize(("q", "k", "kept"), [(4, 4, 10), (1, 1, 1), (2, 5, 3), (5, 2, 1 + 2 + 2 + 2 + 2)])
def test_causal_fraction_counts_the_pairs_a_causal_mask_keeps(q, k, kept):
    mask = torch.ones(q, k, dtype=torch.bool).tril()  # is_causal's mask (top-left aligned)
    assert int(mask.sum()) == kept
    assert causal_fraction(q, k) == kept / (q * k)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_on_a_cpu_is_counted_and_a_causal_mask_halves_it(causal):
    """PyTorch's counter has no formula for the CPU's flash attention (it would count 0) and counts a causal
    mask as the whole product; here both are counted from torch's own formulas."""
    shape = (2, 3, 16, 8)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    counted = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward())
    forward, backward = sdpa_flop_count(shape, shape, shape), sdpa_backward_flop_count(shape, shape, shape, shape)
    share = 17 / 32 if causal else 1.0  # 16 · 17 / 2 of the 16 × 16 pairs
    assert forward > 0 and counted == round(forward * share) + round(backward * share)


def test_a_linear_step_counts_its_three_matmuls():
    x = torch.randn(5, 7, requires_grad=True)
    layer = nn.Linear(7, 3, bias=False)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 5 * 7 * 3  # forward, input and weight grads


def test_the_counting_twin_keeps_the_statistics_route_and_nothing_else():
    model, _ = overhead.build(overhead.validate(overhead.Options(model="tiny")), 16)
    mode = overhead.Mode("isopo_int+gram+eager+outer", model, None, lambda: torch.autocast("cpu", enabled=False),
                         num_samples=8, cuda_graphs=True)
    twin = mode.counting_twin()
    assert twin.name == "isopo_int+gram" and twin.kernel_settings == {} and twin.optimizer is None
    cfg = twin.engine.cfg
    assert (cfg.strategy, cfg.cuda_graphs, cfg.triton_kernels, cfg.compile) == ("gram", False, False, False)


def test_the_twin_counts_what_the_mode_itself_runs_where_both_take_the_torch_path():
    """On a CPU every mode runs the torch path (graphs and Triton kernels are for CUDA tensors): counting the
    mode's own step and its twin's gives the same number."""
    opts = overhead.validate(overhead.Options(model="tiny", batch=2, seq_len=16, num_samples=8,
                                              modes=["reinforce", "isopo_ni:paper+eager", "isopo_int+triton"]))
    model, vocab = overhead.build(opts, 16)
    batch = overhead.make_batch(2, 16, vocab, "cpu", lm_head="response")
    for mode in overhead.make_modes(opts, model):
        mode.begin()
        try:
            own = count_flops(partial(mode.step, batch))
        finally:
            mode.end()
        assert own == overhead._counted_flops(mode, batch, "cpu") > 0, mode.name


def test_isopo_adds_exactly_the_statistics_that_choose_strategy_prices():
    """Counted over a whole step of the tiny preset, each route's FLOPs over REINFORCE's are its statistics'
    matmuls per linear layer — the per-sequence gradients replace the weight gradient at equal cost — plus
    the advantage contraction of the norm gains' per-token gradients (2 FLOPs per element of each gain's
    input)."""
    b, t, k = 2, 24, 16
    names = ["reinforce", *(f"{m}+{route}" for route in ("instantiate", "gram")
                            for m in ("isopo_ni:overlap", "isopo_ni:paper", "isopo_int"))]
    opts = overhead.validate(overhead.Options(model="tiny", batch=b, seq_len=t, modes=names, num_samples=k))
    model, vocab = overhead.build(opts, t)
    batch = overhead.make_batch(b, t, vocab, "cpu")
    gain_elements = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: gain_elements.append(args[0].numel()))
             for m in model.modules() if is_gain_module(m)]
    with torch.no_grad():
        model(input_ids=batch.input_ids, use_cache=False)
    for h in hooks:
        h.remove()
    gains = 2 * sum(gain_elements)
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    n = b * t

    def per_layer(cost) -> int:
        return sum(cost(d_in, d_out) for d_in, d_out in shapes)

    weighted_sum = per_layer(lambda i, o: 2 * b * i * o)  # Σ_i w_i G_i from the formed G
    expected = {
        "isopo_ni:overlap+instantiate": per_layer(lambda i, o: 2 * b * k * i * o) + weighted_sum,
        "isopo_ni:paper+instantiate": per_layer(lambda i, o: 2 * b * k * i * o) + weighted_sum,
        "isopo_int+instantiate": per_layer(lambda i, o: 2 * b * b * i * o) + weighted_sum,
        # The Gram route forms no G: its weight gradient is the ordinary matmul with δ scaled per token.
        "isopo_ni:overlap+gram": per_layer(lambda i, o: 2 * n * k * (i + o)),
        "isopo_ni:paper+gram": per_layer(lambda i, o: 2 * n * k * (i + o) + 2 * b * t * t * (i + o)),  # + N_i
        "isopo_int+gram": per_layer(lambda i, o: 2 * n * n * (i + o)),
    }
    counted = {m.name: overhead._counted_flops(m, batch, "cpu") for m in overhead.make_modes(opts, model)}
    assert {name: counted[name] - counted["reinforce"] - gains for name in expected} == expected


def test_a_step_that_cannot_be_counted_leaves_the_timings_and_reports_no_flops(tmp_path, monkeypatch, capsys):
    def fail(step):
        raise torch.OutOfMemoryError("no room for the eager twin")

    monkeypatch.setattr(overhead, "count_flops", fail)
    out = tmp_path / "o.json"
    assert main(["overhead", "--model", "tiny", "--batch", "2", "--seq-len", "16", "--repeats", "1",
                 "--modes", "isopo_int", "--malloc", "system", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert all(r["gflop"] is None and r["flop_ratio_vs_reinforce"] is None and r["median_s"] > 0
               for r in results.values())
    captured = capsys.readouterr()
    assert "could not count the FLOPs of mode isopo_int (OutOfMemoryError)" in captured.err
    assert overhead_table([{**json.loads(out.read_text()), "source": str(out)}])["flop_ratio"].isna().all()
