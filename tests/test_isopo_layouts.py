"""Token layouts other than the input's (the trainer's LM head runs from the first response column only), and
the two ways non-Linear parameters take the REINFORCE gradient. Every check is exact, in float64."""

from __future__ import annotations

import pytest
import torch
from isopo_fixtures import make_batch, masked_sum, tiny_qwen3, token_log_probs
from torch import nn

from algorithms.isopo import Isopo, IsopoConfig
from algorithms.isopo.params import ReinforceGainForward, ReinforceParamsForward, is_gain_module

# Long prompts and short responses: the LM head skips the first columns, and the overlap sample (drawn over
# every valid input position) often lands there.
PROMPTS, RESPONSES = (6, 9, 7, 11), (4, 2, 5, 3)


def _suffix_log_probs(model, batch, first):
    """Log-probs of positions first..S-2 with the LM head run on columns first..S-1 only."""
    s = batch["input_ids"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=s - first).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return logp.gather(-1, batch["input_ids"][:, first + 1 :].unsqueeze(-1)).squeeze(-1)


def _grads(model, cfg, batches, sliced: bool):
    engine = Isopo(model, cfg)
    model.zero_grad(set_to_none=True)
    layouts = []
    with engine.installed():
        for b in batches:
            rows, cols = b["seq_ids"].shape
            first = int(b["response_mask"].any(0).long().argmax())
            assert first > 0
            views = [torch.arange(rows * cols).view(rows, cols)[:, first:]] if sliced else []
            with engine.micro_batch(b["seq_ids"], b["advantages"], views=views) as mb:
                if sliced:
                    logp = _suffix_log_probs(model, b, first)
                    loss = -(logp * b["response_mask"][:, first:-1]).sum()
                else:
                    loss = -masked_sum(token_log_probs(model, b["input_ids"], b["attention_mask"]), b["response_mask"])
                loss.backward()
                layouts.append(mb.layouts)
        engine.end_step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, layouts


@pytest.mark.parametrize(
    "cfg",
    [
        IsopoConfig(setting="paper", num_samples=7, seed=5),
        IsopoConfig(setting="paper", num_samples=1, seed=0),
        IsopoConfig(setting="overlap", num_samples=1000),
        IsopoConfig(setting="paper", num_samples=7, seed=5, strategy="gram"),
        IsopoConfig(variant="interacting", setting=None),
    ],
    ids=["paper-K7", "paper-K1", "overlap-all-positions", "paper-gram", "interacting"],
)
def test_lm_head_on_the_response_columns_equals_the_full_layout(cfg):
    batches = [make_batch(11, PROMPTS, RESPONSES), make_batch(12, PROMPTS[::-1], RESPONSES)]
    model = tiny_qwen3(seed=2, tie=False)
    full, _ = _grads(model, cfg, batches, sliced=False)
    sliced, layouts = _grads(model, cfg, batches, sliced=True)
    for name in full:
        # Dropping the samples outside the view changes the summation order: float64 rounding of the layer's
        # own scale (paper weights N²/O³ reach 1e6 on this tiny random model).
        scale = float(full[name].abs().max())
        torch.testing.assert_close(sliced[name], full[name], rtol=1e-12, atol=1e-12 * max(scale, 1.0))
    # The LM head really saw a narrower layout, and (for the sampled settings) the view dropped the samples
    # that fell outside it; with K = 1 some layer's whole sample did.
    assert all(len(lay) == 2 and lay[1].shape[1] < lay[0].shape[1] for lay in layouts)
    if cfg.variant == "non_interacting" and cfg.num_samples < 100:
        assert any(lay[1].samples_dropped > 0 for lay in layouts)
        for lay in layouts:
            kept = sum(len(s) for s in lay[1].samples)
            assert kept + lay[1].samples_dropped == lay[0].samples.total
    if cfg.num_samples == 1:
        assert any(len(s) == 0 for lay in layouts for s in lay[1].samples)


def test_a_layer_outside_every_layout_gets_one_clear_error():
    model = tiny_qwen3(seed=0)
    b = make_batch(3, PROMPTS, RESPONSES)
    engine = Isopo(model, IsopoConfig())
    with engine.installed(), engine.micro_batch(b["seq_ids"], b["advantages"]):
        with pytest.raises(RuntimeError, match="ISOPO layer lm_head: .* match no token layout"):
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=3)


def test_views_that_repeat_or_leave_the_input_are_refused():
    b = make_batch(3, PROMPTS, RESPONSES)
    engine = Isopo(tiny_qwen3(seed=0), IsopoConfig())
    n = b["seq_ids"].numel()
    for positions, message in (
        (torch.tensor([[0, 0, 1]]), "repeat"),
        (torch.tensor([[0, n]]), "must lie in"),
        (torch.arange(n).view(b["seq_ids"].shape), "already has a token layout"),
    ):
        with pytest.raises(ValueError, match=message):
            with engine.micro_batch(b["seq_ids"], b["advantages"], views=[positions]):
                pass


class _Block(nn.Module):
    """A LayerNorm with a bias and an RMSNorm-style gain around a Linear: both non-Linear paths."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.gain = _Gain(6)
        self.proj = nn.Linear(6, 11)

    def forward(self, ids):
        return self.proj(self.gain(self.norm(self.embed(ids))))


class _Gain(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_non_linear_parameters_take_the_exact_reinforce_gradient():
    torch.manual_seed(0)
    model = _Block().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 11, (3, 5))
    seq_ids = torch.tensor([[0] * 5, [1] * 4 + [-1], [2] * 3 + [-1] * 2])
    adv = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)

    def logp_of(m):
        return torch.log_softmax(m(ids), -1).gather(-1, ids.roll(-1, 1).unsqueeze(-1)).squeeze(-1)

    valid = (seq_ids >= 0).double()
    model.zero_grad()
    (-(logp_of(model) * valid * adv[seq_ids.clamp(min=0)]).sum()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    engine = Isopo(model, IsopoConfig(setting="reinforce"))
    assert is_gain_module(model.gain) and not is_gain_module(model.norm) and not is_gain_module(model.embed)
    model.zero_grad()
    with engine.installed():
        assert isinstance(model.gain.forward, ReinforceGainForward)
        assert isinstance(model.norm.forward, ReinforceParamsForward)
        with engine.micro_batch(seq_ids, adv):
            (-(logp_of(model) * valid).sum()).backward()
    assert "forward" not in vars(model.gain) and "forward" not in vars(model.norm)  # removal restores them
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-12, msg=name)


def test_per_head_gains_see_the_token_layout_as_a_prefix():
    # Qwen3's q/k norms work on (B, T, heads, head_dim): the gain path contracts the head axis as well.
    model = tiny_qwen3(seed=1)
    b = make_batch(4, PROMPTS, RESPONSES)
    n_tok = float(b["response_mask"].sum())
    model.zero_grad()
    logp = token_log_probs(model, b["input_ids"], b["attention_mask"])
    (-masked_sum(logp, b["response_mask"], b["advantages"]) / n_tok).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if "norm" in n}
    engine = Isopo(model, IsopoConfig(setting="reinforce"))
    model.zero_grad()
    with engine.installed(), engine.micro_batch(b["seq_ids"], b["advantages"]):
        logp = token_log_probs(model, b["input_ids"], b["attention_mask"])
        (-masked_sum(logp, b["response_mask"]) / n_tok).backward()
    assert any("q_norm" in n for n in expected)
    for name, grad in expected.items():
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(p.grad, grad, rtol=1e-10, atol=1e-12, msg=name)
