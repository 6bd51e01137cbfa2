"""Efficient single-backward ISOPO against the naive per-sequence reference, in float64."""

from __future__ import annotations

import contextlib

import pytest
import torch
from isopo_fixtures import make_batch, masked_sum, tiny_qwen3, token_log_probs

from algorithms.isopo import Isopo, IsopoConfig, draw_overlap_samples
from algorithms.isopo.reference import ReferenceIsopo, RefSequence
from algorithms.isopo.weights import LayerEma, update_emas

# Three optimizer steps of two micro-batches each: padded rows of unequal length.
STEPS = [
    [((3, 5, 2, 4), (4, 2, 6, 3)), ((2, 4, 3), (5, 3, 2))],
    [((4, 2, 3), (3, 6, 2)), ((3, 3, 5, 2), (2, 4, 1, 5))],
    [((2, 5, 4, 3), (6, 2, 3, 4)), ((5, 2), (2, 5))],
]


# Two padded micro-batches of the same size B per step: layers of one shape meet new advantages.
SAME_B_STEPS = [
    [((3, 5, 2), (4, 2, 6)), ((2, 4, 3), (5, 3, 2))],
    [((4, 2, 3), (3, 6, 2)), ((3, 3, 5), (2, 4, 1))],
    [((2, 3, 4), (3, 2, 5)), ((5, 2, 2), (2, 3, 3))],
]


# Equal lengths within each micro-batch: no padding, so the backward skips its masking steps.
UNPADDED_STEPS = [
    [((3, 3, 3), (4, 4, 4)), ((2, 2), (5, 5))],
    [((4, 4), (3, 3)), ((3, 3, 3, 3), (2, 2, 2, 2))],
]


def step_batches(step: int, spec=None):
    spec = spec or STEPS
    return [make_batch(100 * step + j, p, r) for j, (p, r) in enumerate(spec[step])]


def response_tokens(batches) -> float:
    return float(sum(b["response_mask"].sum() for b in batches))


def efficient_step(model, engine: Isopo, batches, n_tok, loss_scale=1.0, permute=False, autocast=None):
    model.zero_grad(set_to_none=True)
    with engine.installed():
        for b in batches:
            seq_ids, adv = b["seq_ids"], b["advantages"]
            if permute:  # number the sequences against the row order: exercises the gathered layout
                n = adv.numel()
                seq_ids = torch.where(seq_ids >= 0, n - 1 - seq_ids, -1)
                adv = adv.flip(0)
            with engine.micro_batch(seq_ids, adv):
                with autocast() if autocast else contextlib.nullcontext():
                    logp = token_log_probs(model, b["input_ids"], b["attention_mask"])
                (-loss_scale * masked_sum(logp, b["response_mask"]) / n_tok).backward()
    engine.end_step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference_step(model, ref: ReferenceIsopo, batches, n_tok, step: int, n_layers: int, k: int, seed: int):
    total: dict[str, torch.Tensor] = {}
    for j, b in enumerate(batches):
        seqs = []
        for i, length in enumerate(b["lens"]):
            ids = b["input_ids"][i, :length]
            mask = b["response_mask"][i, :length]

            def loss_fn(logits, ids=ids, mask=mask):
                logp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)
                return -(logp * mask[:-1]).sum() / n_tok

            seqs.append(RefSequence(ids, loss_fn, float(b["advantages"][i])))
        samples = draw_overlap_samples(sum(b["lens"]), k, n_layers, seed, step, j)
        for name, g in ref.micro_batch_grads(seqs, samples).items():
            total[name] = total.get(name, 0) + g
    ref.end_step()
    return total


def assert_rel_close(eff, ref, tol=1e-8, names=None):
    for name in names or ref:
        r, e = ref[name], eff[name]
        err = float((e - r).norm() / r.norm().clamp_min(1e-300))
        assert err <= tol, f"{name}: relative error {err:.2e}"


def run_against_reference(cfg: IsopoConfig, strategy_cfgs=None, steps=3, spec=None):
    """Three consecutive optimizer steps (so the EMAs matter), updating the weights between them."""
    model = tiny_qwen3()
    ref = ReferenceIsopo(model, cfg)
    engines = [Isopo(model, c) for c in (strategy_cfgs or [cfg])]
    for step in range(steps):
        batches = step_batches(step, spec)
        n_tok = response_tokens(batches)
        expected = reference_step(model, ref, batches, n_tok, step, len(engines[0].layers), cfg.num_samples, cfg.seed)
        grads = None
        for engine in engines:
            grads = efficient_step(model, engine, batches, n_tok)
            assert_rel_close(grads, expected)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.sub_(0.5 * grads[n] / grads[n].norm())


@pytest.mark.parametrize("setting", ["paper", "overlap", "rel_overlap"])
@pytest.mark.parametrize("reg_form", ["additive", "keep_small_invariant"])
def test_non_interacting_matches_reference(setting, reg_form):
    # K = 9 < tokens per micro-batch, so the overlap sample is a real subsample.
    cfg = IsopoConfig(setting=setting, reg_form=reg_form, c_n=0.5, c_o=0.3, c_r=0.2, num_samples=9, seed=3)
    run_against_reference(cfg, [cfg.replace(strategy=s) for s in ("instantiate", "gram")])


def test_unregularised_named_settings_and_free_exponents_match_reference():
    for cfg in (
        IsopoConfig(setting="paper", num_samples=250),
        IsopoConfig(setting="overlap", num_samples=9),  # N is not computed at all
        IsopoConfig(setting=None, p=0.5, q=-1.0, r=-1.5, c_n=0.1, c_o=0.0, c_r=1.0, num_samples=5),
    ):
        # and G formed in chunks (40 kB: the MLP's at B = 4), where N's blocks are not summed either
        variants = [cfg.replace(strategy=s) for s in ("instantiate", "gram")]
        run_against_reference(cfg, [*variants, cfg.replace(strategy="instantiate", chunk_bytes=40_000)], steps=2)


def test_batch_without_padding_matches_reference():
    assert not any(bool((b["seq_ids"] < 0).any()) for step in (0, 1) for b in step_batches(step, UNPADDED_STEPS))
    for variant in ("non_interacting", "interacting"):
        cfg = IsopoConfig(variant=variant, setting="paper", c_o=0.3, num_samples=9)
        run_against_reference(cfg, [cfg.replace(strategy=s) for s in ("instantiate", "gram")], steps=2,
                              spec=UNPADDED_STEPS)


def test_chunked_output_dimension_matches_reference():
    # A budget of a few hundred elements forces every layer, the LM head included, into many chunks.
    cfg = IsopoConfig(setting="paper", c_o=0.3, num_samples=9, strategy="instantiate", chunk_bytes=4096)
    run_against_reference(cfg, steps=2)


@pytest.mark.parametrize("c_lambda", [1.0, 0.05])
def test_interacting_matches_reference(c_lambda):
    cfg = IsopoConfig(variant="interacting", c_lambda=c_lambda)
    run_against_reference(cfg, [cfg.replace(strategy=s) for s in ("instantiate", "gram")])


def _reinforce_grads(model, batches, n_tok):
    model.zero_grad(set_to_none=True)
    for b in batches:
        logp = token_log_probs(model, b["input_ids"], b["attention_mask"])
        (-masked_sum(logp, b["response_mask"], b["advantages"]) / n_tok).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("p, q, r", [(0.0, -1.0, -2.0), (0.0, -1.0, 0.0), (0.0, 0.0, -2.0), (0.5, 1.0, -1.5),
                                     (1.0, 0.0, 1.0), (0.0, 2.0, 0.0)])
def test_unregularised_weights_equal_the_spelled_out_rule_on_degenerate_statistics(p, q, r):
    """The unregularised weights take A N^(p−r) O^(q+r); the rule spells out A N^p O^q R^r with O = 0 where
    the overlap's denominator vanishes, R = 0 where N does, and 0 wherever the product is not finite. Rows
    with N = 0 (then no overlap either), with O = 0 only, and a layer whose sampled tokens carry nothing."""
    from algorithms.isopo.weights import needs_norm, non_interacting_weights

    cfg = IsopoConfig(setting=None, p=p, q=q, r=r)
    gen = torch.Generator().manual_seed(0)
    norm = torch.tensor([0.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    overlap_num = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    overlap_num[0] = 0.0  # N = 0: the sequence has no gradient in this layer
    overlap_num[1] = 0.0  # O = 0 with N > 0
    adv = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)
    for den in (torch.tensor(1.7, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)):
        overlap = overlap_num.norm(dim=1) / den if den > 0 else torch.zeros(4, dtype=torch.float64)
        ratio = torch.where(norm > 0, overlap / norm, 0.0)
        expected = adv * norm**p * overlap**q * ratio**r
        expected = torch.where(torch.isfinite(expected), expected, 0.0)
        got = non_interacting_weights(norm, overlap_num, den, adv, cfg, {}, {})
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
        assert bool((got[2:] != 0).all()) or den == 0
        if not needs_norm(cfg):  # the pass over G that computes N is skipped: the weights never read it
            torch.testing.assert_close(non_interacting_weights(None, overlap_num, den, adv, cfg, {}, {}), got,
                                       rtol=0, atol=0)


def test_the_norm_is_computed_only_for_weights_that_read_it():
    from algorithms.isopo.weights import needs_norm

    named = {name: needs_norm(IsopoConfig(setting=name)) for name in ("paper", "overlap", "rel_overlap", "reinforce")}
    assert named == {"paper": True, "overlap": False, "rel_overlap": True, "reinforce": False}
    assert not needs_norm(IsopoConfig(setting="overlap", c_o=0.3))  # Õ regularised, N still unread
    assert needs_norm(IsopoConfig(setting="overlap", c_n=0.1))  # Ñ^0 with c_n: the EMA of N² is recorded
    assert needs_norm(IsopoConfig(setting=None, p=0.0, q=1.0, r=-1.0))  # the general rule's ratio O/N


@pytest.mark.parametrize(
    "cfg",
    [IsopoConfig(setting="paper", num_samples=9), IsopoConfig(setting="rel_overlap", c_n=0.5, c_o=0.3, c_r=0.2),
     IsopoConfig(variant="interacting", setting=None), IsopoConfig(setting="paper", strategy="gram")],
    ids=["paper", "regularised", "interacting", "gram"],
)
def test_the_backward_never_reads_a_value_back_to_the_host(cfg):
    """On a GPU, reading a device value on the host inside the backward (``.item()``, ``nonzero``, the pivot
    check ``linalg.solve`` makes) stalls every layer. On this CPU the profiler still shows such reads: none
    may happen in the backward once the micro-batch's one-off host work (drawing the samples) is done."""
    from torch.profiler import profile

    model = tiny_qwen3()
    engine = Isopo(model, cfg)
    batches = step_batches(0)
    n_tok = response_tokens(batches)
    reads = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")
    with engine.installed():
        for _ in range(2):  # the second step reads EMAs
            for b in batches:
                with engine.micro_batch(b["seq_ids"], b["advantages"]) as mb:
                    loss = -masked_sum(token_log_probs(model, b["input_ids"], b["attention_mask"]),
                                       b["response_mask"]) / n_tok
                    for layout in mb.layouts:
                        layout.samples[0]  # the lazy draw and its one copy to the device
                    with profile() as prof:
                        loss.backward()
                    names = [e.name for e in prof.events()]
                    assert "IsopoLinearFunctionBackward" in names
                    assert not [n for n in names if n in reads], sorted({n for n in names if n in reads})
            engine.end_step()


def test_compiled_layers_match_the_reference():
    """IsopoConfig.compile: every layer's update through torch.compile (here inductor's CPU backend) is the
    same function, so it meets the reference as the eager one does — the padded gather, the EMAs of a
    regularised setting and of the interacting damping over two steps, and next to them the layers whose G is
    formed in chunks (with 40 kB: the MLP's at B = 4), which stay eager."""
    import algorithms.isopo.linear as linear

    for cfg in (IsopoConfig(setting="rel_overlap", c_n=0.5, c_o=0.3, c_r=0.2, num_samples=9, seed=3,
                            chunk_bytes=40_000),
                IsopoConfig(variant="interacting", setting=None, c_lambda=0.5)):
        run_against_reference(cfg, [cfg.replace(compile=True)], steps=2)
    # A failed compile would have fallen back to eager and hidden the comparison.
    assert linear._compiled is not None and not linear._compile_failed


@pytest.mark.parametrize("kept", [32, 1])
def test_graph_tails_on_static_buffers_match_the_reference(monkeypatch, kept):
    """IsopoConfig.cuda_graphs without the capture (a CPU has none): G and the samples written into a shape's
    static buffers, which same-shape layers (k/v, gate/up) share, the advantages copied once per micro-batch,
    the EMAs per layer, the tail run on them. Over two steps of two padded micro-batches of equal B (one
    shape's buffers meet a new micro-batch), with the EMAs of a regularised setting and of the interacting
    damping; kept=1 drops and rebuilds the buffers at every new shape. The chunked layers (40 kB) stay on the
    eager path beside them."""
    import algorithms.isopo.engine as engine_module
    from algorithms.isopo.graphs import TailGraphs

    made = []

    def tail_graphs():
        made.append(TailGraphs(capture=False, kept=kept))
        return made[-1]

    monkeypatch.setattr(engine_module, "TailGraphs", tail_graphs)
    for cfg in (IsopoConfig(setting="rel_overlap", c_n=0.5, c_o=0.3, c_r=0.2, num_samples=9, seed=3,
                            chunk_bytes=40_000, strategy="instantiate"),
                IsopoConfig(variant="interacting", setting=None, c_lambda=0.5, strategy="instantiate")):
        run_against_reference(cfg, [cfg.replace(cuda_graphs=True)], steps=3, spec=SAME_B_STEPS)
    assert len(made) == 2 and all(0 < len(g) <= kept and not g.failed for g in made)


def test_graph_slots_copy_a_layers_emas_only_when_the_visiting_order_changes():
    """A graph's visits read their EMAs from slots that the end of a step refreshes for the layers that
    visited them: from the third step on (the first with EMAs is the second) a visit in the same order copies
    nothing, and every gradient and EMA equals the eager engine's."""
    model = tiny_qwen3()
    cfg = IsopoConfig(variant="interacting", setting=None, c_lambda=0.5, strategy="instantiate", cuda_graphs=True)
    engine = Isopo(model, cfg)
    engine.graphs.capture = False
    eager = Isopo(model, cfg.replace(cuda_graphs=False))

    def copies():
        return sum(g.ema_copies for g in engine.graphs._graphs.values())

    counts = []
    for step in range(3):
        batches = step_batches(step, SAME_B_STEPS)
        n_tok = response_tokens(batches)
        expected = efficient_step(model, eager, batches, n_tok)
        assert_rel_close(efficient_step(model, engine, batches, n_tok), expected, tol=1e-6)
        counts.append(copies())
    assert counts[0] == 0  # no EMA yet: nothing to read
    assert counts[1] > 0  # the first visits with EMAs fill the slots
    assert counts[2] == counts[1]  # same layers, same order: the refreshed slots serve
    for mine, theirs in zip(engine.layers, eager.layers):
        assert torch.allclose(mine.ema.value["trK"], theirs.ema.value["trK"], rtol=1e-6, atol=0), mine.name
    assert all(g.visits == 0 for g in engine.graphs._graphs.values())  # rewound at the step's end


@pytest.mark.parametrize("cfg", [IsopoConfig(setting="paper", num_samples=9, strategy="instantiate", cuda_graphs=True),
                                 IsopoConfig(variant="interacting", setting=None, strategy="instantiate",
                                             cuda_graphs=True)], ids=["paper", "interacting"])
def test_a_graphs_cursor_moves_only_where_its_visits_have_slots(monkeypatch, cfg):
    """The unregularised paper setting reads no EMA and records nothing, so its graphs' cursor stays put (its
    increment would be one more kernel in every replay); the interacting rule records tr K / B, one slot a
    visit, so there the cursor counts the visits. Read at the step's end, before the cursors are rewound."""
    from algorithms.isopo.graphs import TailGraphs

    seen = []
    real = TailGraphs.collect

    def collect(self):
        seen.extend((int(g.cursor), g.visits, bool(g.record_slots)) for g in self._graphs.values() if g.visits)
        real(self)

    monkeypatch.setattr(TailGraphs, "collect", collect)
    model = tiny_qwen3()
    engine = Isopo(model, cfg)
    engine.graphs.capture = False
    for step in range(2):
        batches = step_batches(step, SAME_B_STEPS)
        efficient_step(model, engine, batches, response_tokens(batches))
    assert len(seen) > 2
    if cfg.variant == "interacting":
        assert all(cursor == visits and records for cursor, visits, records in seen)
    else:
        assert all(cursor == 0 and not records for cursor, _, records in seen)


def test_a_failed_capture_falls_back_to_the_eager_layers(monkeypatch):
    """A capture that raises (a kernel the graph cannot hold, say) warns once, turns the engine's graphs off
    and leaves every layer to the eager path, from the failing layer on: the gradients and EMAs are the
    eager engine's, including the statistics that visits before the failure left in the graphs' slots."""
    from algorithms.isopo.graphs import TailGraph

    real = TailGraph._replay
    calls = {"n": 0}

    def fails_on_the_fifth(self, tail, capture):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(self, tail, capture)

    monkeypatch.setattr(TailGraph, "_replay", fails_on_the_fifth)
    model = tiny_qwen3()
    cfg = IsopoConfig(variant="interacting", setting=None, c_lambda=0.5, strategy="instantiate", cuda_graphs=True)
    engine = Isopo(model, cfg)
    engine.graphs.capture = False
    eager = Isopo(model, cfg.replace(cuda_graphs=False))
    for step in range(2):
        batches = step_batches(step, SAME_B_STEPS)
        n_tok = response_tokens(batches)
        expected = efficient_step(model, eager, batches, n_tok)
        if step == 0:
            with pytest.warns(RuntimeWarning, match="capturing a CUDA graph failed"):
                got = efficient_step(model, engine, batches, n_tok)
        else:
            got = efficient_step(model, engine, batches, n_tok)
        assert_rel_close(got, expected, tol=1e-6)
    assert engine.graphs.failed and calls["n"] == 5
    for mine, theirs in zip(engine.layers, eager.layers):
        assert torch.allclose(mine.ema.value["trK"], theirs.ema.value["trK"], rtol=1e-6, atol=0), mine.name


def test_graph_slots_of_a_shape_a_step_skipped_are_not_reused():
    """A step whose micro-batches have another batch size visits other graphs; the EMAs change at its end,
    so the first graphs' slots are stale and the next visit copies the EMAs afresh (else λ would come
    from an old EMA)."""
    spec = SAME_B_STEPS[:2] + [[((2, 3), (4, 2)), ((3, 2), (2, 5))]] + SAME_B_STEPS[2:]
    model = tiny_qwen3()
    cfg = IsopoConfig(variant="interacting", setting=None, c_lambda=0.5, strategy="instantiate", cuda_graphs=True)
    engine = Isopo(model, cfg)
    engine.graphs.capture = False
    eager = Isopo(model, cfg.replace(cuda_graphs=False))
    for step in range(len(spec)):
        batches = step_batches(step, spec)
        n_tok = response_tokens(batches)
        expected = efficient_step(model, eager, batches, n_tok)
        assert_rel_close(efficient_step(model, engine, batches, n_tok), expected, tol=1e-6)


def test_graph_tails_share_a_shapes_buffers_and_drop_them_with_its_last_graph():
    from algorithms.isopo.graphs import TailGraphs

    graphs = TailGraphs(capture=False, kept=2)
    adv, cpu = torch.zeros(3), torch.device("cpu")
    trk = {"trK": torch.tensor(1.0)}
    before = graphs.get(3, 4, 5, 0, torch.float32, cpu, adv, {}, torch.float32)
    after = graphs.get(3, 4, 5, 0, torch.float32, cpu, adv, trk, torch.float32)  # after the first EMA update
    assert after is not before and after.g is before.g  # one G per shape
    assert graphs.get(3, 4, 5, 0, torch.float32, cpu, adv, {}, torch.float32) is before
    other = graphs.get(3, 5, 4, 0, torch.float32, cpu, adv, {}, torch.float32)  # evicts `after`, the oldest
    assert len(graphs) == 2 and len(graphs._inputs) == 2 and other.g.shape == (3, 4, 5)
    # A layer keeps the graph it used; touch says whether it is still held (and counts as a use).
    assert not graphs.touch(after) and graphs.touch(before)  # `before` is now the newest: `other` goes next
    graphs.get(3, 6, 6, 0, torch.float32, cpu, adv, {}, torch.float32)  # evicts `other`
    assert not graphs.touch(other) and graphs.touch(before)
    graphs.get(3, 7, 7, 0, torch.float32, cpu, adv, {}, torch.float32)  # evicts the (6, 6) graph
    graphs.get(3, 8, 8, 0, torch.float32, cpu, adv, {}, torch.float32)  # evicts `before`: its shape goes
    assert len(graphs) == 2 and len(graphs._inputs) == 2 and not graphs.touch(before)
    assert graphs.get(3, 4, 5, 0, torch.float32, cpu, adv, {}, torch.float32).g is not before.g


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_the_graph_tails_static_gradient_is_copied_unless_autograd_casts_it(monkeypatch, autocast):
    """A replayed CUDA graph hands back the same output tensors for every layer of its shape, the weighted
    gradient among them. Emulated on the CPU (the tail's results copied into buffers kept per graph, as a
    replay writes them): with G in the weight's dtype the gradient must be copied before the next same-shape
    layer overwrites it; under bf16 autocast autograd's cast to the float32 weight makes the copy as the
    backward returns. Both give the eager gradients (and EMAs: the recorded statistics are static outputs
    too, copied as they are recorded), and leaving the gradient's copy out breaks the first."""
    import functools

    import algorithms.isopo.linear as linear
    from algorithms.isopo.graphs import TailGraph

    def replay_like(self, tail, capture):  # TailGraph._replay
        w, grad, recorded = self._call(tail)
        if self.outputs is None:
            self.outputs = (w.clone(), grad.clone(), {k: v.clone() for k, v in recorded.items()})
        else:
            self.outputs[0].copy_(w)
            self.outputs[1].copy_(grad)
            for key, value in recorded.items():
                self.outputs[2][key].copy_(value)
        return self.outputs

    monkeypatch.setattr(TailGraph, "_replay", replay_like)
    # Regularised, so the statistics recorded for the EMAs are static outputs too: they must be copied as well.
    cfg = IsopoConfig(setting="paper", c_n=0.5, c_o=0.5, num_samples=9, strategy="instantiate", cuda_graphs=False)
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if autocast else None
    model = tiny_qwen3(dtype=torch.float32)
    batches = step_batches(0, SAME_B_STEPS)
    n_tok = response_tokens(batches)

    def graphed_step():
        engine = Isopo(model, cfg.replace(cuda_graphs=True))
        engine.graphs.capture = False
        return efficient_step(model, engine, batches, n_tok, autocast=bf16), engine

    eager = Isopo(model, cfg)
    expected = efficient_step(model, eager, batches, n_tok, autocast=bf16)
    got, graphed = graphed_step()
    assert_rel_close(got, expected, tol=1e-6)
    for mine, theirs in zip(graphed.layers, eager.layers):
        assert mine.ema.value.keys() == theirs.ema.value.keys() == {"N", "O"}
        for key, value in theirs.ema.value.items():
            assert torch.allclose(mine.ema.value[key], value, rtol=1e-6, atol=0), (mine.name, key)
    if not autocast:
        monkeypatch.setattr(linear, "_static_gradient_needs_copy", lambda x, weight: False)
        wrong, _ = graphed_step()
        assert any(float((wrong[n] - e).norm()) > 1e-3 * float(e.norm()) for n, e in expected.items())


def test_cuda_graphs_and_compile_are_alternatives():
    with pytest.raises(ValueError, match="compile and cuda_graphs are alternatives"):
        IsopoConfig(compile=True, cuda_graphs=True)
    # By default graphs are on (for CUDA tensors) unless compiling; False turns them off.
    assert IsopoConfig().graphs_enabled and not IsopoConfig(compile=True).graphs_enabled
    assert not IsopoConfig(cuda_graphs=False).graphs_enabled
    model = tiny_qwen3()
    assert Isopo(model, IsopoConfig()).graphs is not None
    assert Isopo(model, IsopoConfig(compile=True)).graphs is None


@pytest.mark.parametrize("strategy", ["instantiate", "gram"])
def test_zero_exponents_reproduce_reinforce(strategy):
    model = tiny_qwen3()
    batches = step_batches(0)
    n_tok = response_tokens(batches)
    expected = _reinforce_grads(model, batches, n_tok)
    engine = Isopo(model, IsopoConfig(setting="reinforce", strategy=strategy, c_n=1.0, c_o=1.0, c_r=1.0))
    assert_rel_close(efficient_step(model, engine, batches, n_tok), expected, tol=1e-12)


def test_interacting_with_huge_damping_converges_to_reinforce():
    model = tiny_qwen3()
    batches = step_batches(1)
    n_tok = response_tokens(batches)
    expected = _reinforce_grads(model, batches, n_tok)
    errors = []
    for c_lambda in (1e2, 1e4, 1e6):
        engine = Isopo(model, IsopoConfig(variant="interacting", c_lambda=c_lambda))
        got = efficient_step(model, engine, batches, n_tok)
        errors.append(max(float((got[n] - expected[n]).norm() / expected[n].norm()) for n in expected))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5


@pytest.mark.parametrize("variant", ["non_interacting", "interacting"])
def test_sequence_numbering_against_row_order_gives_same_gradient(variant):
    model = tiny_qwen3()
    batches = step_batches(0)
    n_tok = response_tokens(batches)
    cfg = IsopoConfig(variant=variant, setting="paper", num_samples=9)
    rows = efficient_step(model, Isopo(model, cfg), batches, n_tok)
    gathered = efficient_step(model, Isopo(model, cfg), batches, n_tok, permute=True)
    assert_rel_close(gathered, rows, tol=1e-12)


def test_overlap_update_is_invariant_to_loss_scale():
    model = tiny_qwen3(tie=False)
    batches = step_batches(2)
    n_tok = response_tokens(batches)
    cfg = IsopoConfig(setting="overlap", num_samples=9)
    base = efficient_step(model, Isopo(model, cfg), batches, n_tok)
    scaled = efficient_step(model, Isopo(model, cfg), batches, n_tok, loss_scale=37.5)
    linear_weights = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert_rel_close(scaled, base, tol=1e-10, names=linear_weights)
    # The non-Linear parameters take the REINFORCE gradient, which does scale: the check can fail.
    norm_gain = "model.norm.weight"
    assert torch.allclose(scaled[norm_gain], 37.5 * base[norm_gain], rtol=1e-10)


class _Doubling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def test_direct_apply_computes_what_apply_does_and_falls_back_without_the_cpp_apply(monkeypatch):
    from algorithms.isopo.autograd import direct_apply

    x = torch.randn(3, requires_grad=True)
    apply = direct_apply(_Doubling)
    assert apply is not _Doubling.apply
    y = apply(x, 3.0)
    y.sum().backward()
    assert torch.equal(y, 3.0 * x) and y.grad_fn.name() == "_DoublingBackward"
    assert torch.equal(x.grad, torch.full((3,), 3.0))
    monkeypatch.setattr(torch._C, "_FunctionBase", None)
    assert direct_apply(_Doubling) == _Doubling.apply


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_installing_and_removing_leaves_forward_unchanged(dtype):
    model = tiny_qwen3(dtype=dtype)
    b = step_batches(0)[0]
    before = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    forwards_before = {name: vars(m).get("forward") for name, m in model.named_modules()}
    engine = Isopo(model, IsopoConfig())
    with engine.installed():
        with engine.micro_batch(b["seq_ids"], b["advantages"]):
            during = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        outside = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    after = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    for other in (during, outside, after):
        assert torch.equal(before, other)
    assert {name: vars(m).get("forward") for name, m in model.named_modules()} == forwards_before


def test_under_autocast_the_forward_is_autocasts_own():
    """bf16 autocast: ISOPO's linear casts its operands itself and leaves autocast on; the logits are bitwise
    those of the plain model under the same autocast."""
    model = tiny_qwen3(dtype=torch.float32)
    b = step_batches(0)[0]

    def logits():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    before = logits()
    engine = Isopo(model, IsopoConfig())
    with engine.installed(), engine.micro_batch(b["seq_ids"], b["advantages"]):
        during = logits()
    assert during.dtype == before.dtype and torch.equal(before, during)


def test_float32_runs_and_is_close_to_float64():
    model64 = tiny_qwen3()
    model32 = tiny_qwen3(dtype=torch.float32)
    batches = step_batches(0)
    n_tok = response_tokens(batches)
    cfg = IsopoConfig(setting="paper", num_samples=9)
    g64 = efficient_step(model64, Isopo(model64, cfg), batches, n_tok)
    g32 = efficient_step(model32, Isopo(model32, cfg), batches, n_tok)
    for n in g64:
        assert g32[n].dtype == torch.float32
        assert float((g32[n].double() - g64[n]).norm() / g64[n].norm()) < 1e-3, n


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_samples=-1), "num_samples"),
        (dict(num_samples=0), "num_samples"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(setting="fastest"), "valid settings: paper, overlap, rel_overlap"),
        (dict(reg_form="multiplicative"), "reg_form"),
        (dict(c_o=-1.0), "c_o"),
        (dict(variant="interacting", c_lambda=0.0), "c_lambda"),
        (dict(variant="both"), "variant"),
        (dict(strategy="fast"), "strategy"),
    ],
)
def test_out_of_range_settings_give_one_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        IsopoConfig(**changes)


def test_batched_ema_update_equals_each_layers_own_rule():
    """update_emas folds every layer's statistics at once (multi-tensor operations): first updates, later
    updates with several micro-batches a step and layers of other decays give exactly the spelled-out rule."""
    gen = torch.Generator().manual_seed(3)
    emas = [LayerEma(decay) for decay in (0.9, 0.9, 0.5, 0.99)]
    expected: list[dict[str, torch.Tensor]] = [{} for _ in emas]
    for step in range(4):
        for index, (ema, want) in enumerate(zip(emas, expected)):
            keys = ("N", "trK") if step or index % 2 else ("N",)  # "trK" first seen at step 1 in some layers
            for key in keys:
                values = [torch.rand((), generator=gen, dtype=torch.float64) for _ in range(1 + (step + index) % 3)]
                for value in values:
                    ema.record(key, value)
                mean = sum(values[1:], values[0]) / len(values)
                want[key] = mean if key not in want else ema.decay * want[key] + (1.0 - ema.decay) * mean
        update_emas(emas)
        for ema, want in zip(emas, expected):
            assert set(ema.value) == set(want)
            for key, value in want.items():
                assert torch.equal(ema.value[key], value), (step, key)


@pytest.mark.parametrize("n, k", [(8192, 250), (600, 250), (300, 250), (6, 10), (40_000, 30_000)])  # last: layers in blocks
def test_overlap_samples_are_k_distinct_valid_positions_per_layer_and_repeat_with_the_seed(n, k):
    samples = draw_overlap_samples(n, k, 197, seed=3, step=2, micro=1)
    k = min(k, n)
    assert samples.shape == (197, k) and samples.dtype == torch.long
    assert int(samples.min()) >= 0 and int(samples.max()) < n
    assert all(len(set(row)) == k for row in samples.tolist())
    assert torch.equal(samples, draw_overlap_samples(n, k, 197, seed=3, step=2, micro=1))
    if k < n:  # another micro-batch, step or seed draws other positions
        for other in [(3, 2, 0), (3, 1, 1), (4, 2, 1)]:
            assert not torch.equal(samples, draw_overlap_samples(n, k, 197, *other))


@pytest.mark.parametrize("n, k", [(6, 3), (5, 3)])  # drawn by rejection, and by ranking every position
def test_overlap_samples_are_uniform_subsets_in_uniform_order(n, k):
    """Each K-subset equally likely, and each position equally likely first: a draw without replacement
    (60,000 layers' draws; a chi-square test at the 0.1 % level, with fixed seeds)."""
    from itertools import combinations

    from scipy.stats import chisquare

    rows = draw_overlap_samples(n, k, 60_000, seed=0, step=0, micro=0)
    subsets = {s: i for i, s in enumerate(combinations(range(n), k))}
    subset_counts = torch.bincount(torch.tensor([subsets[tuple(sorted(r))] for r in rows.tolist()]),
                                   minlength=len(subsets))
    assert chisquare(subset_counts.numpy()).pvalue > 1e-3
    assert chisquare(torch.bincount(rows[:, 0], minlength=n).numpy()).pvalue > 1e-3
    assert chisquare(torch.bincount(rows[:, -1], minlength=n).numpy()).pvalue > 1e-3


def test_output_blocks_fit_the_budget_and_start_on_16_byte_boundaries():
    """A block holds at most chunk_bytes of G, a multiple of 8 rows where 8 fit (so each block's columns of
    δ start 16 bytes apart in bf16); fewer rows than 8 as they come; None where G fits whole."""
    from algorithms.isopo.statistics import output_chunk

    assert output_chunk(256 * 2**20, 2, 8, 1024, 151936) == 16384  # Qwen3-0.6B's LM head, B = 8, bf16
    for chunk_bytes, b, d_in, d_out in [(12_000, 3, 32, 48), (10**6, 7, 100, 5000), (3000, 2, 100, 50)]:
        rows = output_chunk(chunk_bytes, 4, b, d_in, d_out)
        assert rows * 4 * b * d_in <= chunk_bytes and rows < d_out
        assert rows % 8 == 0 or rows < 8
    assert output_chunk(12_000, 4, 3, 32, 48) == 24  # 31 rows fit
    assert output_chunk(10**9, 4, 8, 1024, 2048) is None


def test_auto_strategy_forms_g_at_qwen3_shapes_lm_head_included():
    """At Qwen3-0.6B's shapes (B = 8, T = 1024, K = 250; the LM head on the 513 response columns, K ≈ 125)
    every layer forms G, the LM head's in blocks (2.5 GB in bf16): on an H200 that step ran at 1.102× of
    REINFORCE, the LM head's Gram route at 1.159×. The Gram route stays the choice where it is the far
    smaller computation (a short T against wide layers), and a named strategy is kept."""
    from algorithms.isopo.statistics import choose_strategy, output_chunk

    chunk_bytes = IsopoConfig().chunk_bytes
    for d_in, d_out in [(1024, 2048), (1024, 3072), (3072, 1024)]:
        assert output_chunk(chunk_bytes, 2, 8, d_in, d_out) is None
        for interacting in (False, True):
            assert choose_strategy("auto", 8, 1024, d_in, d_out, 250, interacting) == "instantiate"
    assert output_chunk(chunk_bytes, 2, 8, 1024, 151936) is not None
    for interacting, k in ((False, 125), (True, 0)):
        assert choose_strategy("auto", 8, 513, 1024, 151936, k, interacting) == "instantiate"
    assert choose_strategy("auto", 8, 16, 1024, 3072, 4, False) == "gram"
    assert choose_strategy("auto", 2, 4, 1024, 3072, 0, True) == "gram"
    assert choose_strategy("gram", 8, 1024, 1024, 3072, 250, False) == "gram"
    assert choose_strategy("instantiate", 8, 16, 1024, 3072, 4, False) == "instantiate"


@pytest.mark.parametrize("interacting", [False, True])
def test_gram_route_with_float32_output_matmuls_equals_the_float32_copy(monkeypatch, interacting):
    """The Gram route's CUDA path hands bf16 a and δ straight to matmuls with float32 output
    (``out_dtype``, which the CPU lacks): with those matmuls emulated in float32, the same statistics as
    copying a and δ to float32 first — the same operands, transposes and reshapes."""
    from algorithms.isopo import statistics

    gen = torch.Generator().manual_seed(0)
    b, t, d_in, d_out, k = 3, 5, 4, 6, 7
    a = torch.randn(b, t, d_in, generator=gen).bfloat16()
    d = torch.randn(b, t, d_out, generator=gen).bfloat16()
    a_k, d_k = (None, None) if interacting else (a.reshape(-1, d_in)[:k], d.reshape(-1, d_out)[:k])
    copied = statistics._gram(a, d, a_k, d_k, interacting, torch.float32)
    calls = []

    def to_float(op):
        def emulated(x, y, out_dtype):
            assert x.dtype == y.dtype == torch.bfloat16  # no float32 copy of the operands beforehand
            calls.append(op)
            return op(x.float(), y.float()).to(out_dtype)
        return emulated

    monkeypatch.setattr(torch, "bmm", to_float(torch.bmm))
    monkeypatch.setattr(torch, "mm", to_float(torch.mm))
    direct = statistics._gram(a, d, a_k, d_k, interacting, torch.float32, fp32_out=True)
    assert calls  # the direct path ran
    for got, want in [(direct.ntk, copied.ntk), (direct.norm, copied.norm), (direct.overlap_num, copied.overlap_num)]:
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
