"""The rollout harness: generation against a no-cache reference, keyed randomness, and the training view."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chi2
from transformers import DynamicCache

from bench.models import build_model, tiny_qwen3_config
from bench.rollout import (
    Rollout,
    SamplingConfig,
    _mix,
    generate,
    to_train_batch,
    token_log_probs,
)

VOCAB = 20
PAD = 0
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15], [16], [17, 18, 19, 3, 4]]
KEYS = [100, 101, 102, 103, 104]


@pytest.fixture(scope="module")
def model64():
    return build_model(tiny_qwen3_config(VOCAB, init_std=0.2), seed=7, dtype=torch.float64)


def run(model, prompts=PROMPTS, keys=KEYS, *, seed=0, step=0, eos=2, **cfg):
    return generate(
        model, prompts, keys=keys, seed=seed, step=step, cfg=SamplingConfig(**cfg), pad_id=PAD, eos_id=eos
    )


def row_response(r: Rollout, i: int) -> list[int]:
    return r.response_ids[i, : int(r.response_lengths[i])].tolist()


@torch.no_grad()
def reference_greedy(model, prompt, max_new, eos):
    """Full forward over the unpadded sequence at every step, no cache."""
    seq, tokens, logps = list(prompt), [], []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        tok = int(logits.argmax())
        tokens.append(tok)
        logps.append(float(torch.log_softmax(logits, -1)[tok]))
        seq.append(tok)
        if tok == eos:
            break
    return tokens, logps


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are the same at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.config = tiny_qwen3_config(logits.numel(), hidden=8, layers=1, heads=1, kv_heads=1)
        self.calls = 0

    def forward(self, input_ids, logits_to_keep=0, **_):
        self.calls += 1
        keep = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], keep, -1))


# ---------------------------------------------------------------- noise


def test_mix_matches_unsigned_splitmix64():
    mask = (1 << 64) - 1

    def ref(x):
        x &= mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    xs = [0, 1, 12345, 2**63 - 1, -1, -(2**63), 0x9E3779B97F4A7C15 - 2**64]
    assert [v & mask for v in _mix(torch.tensor(xs)).tolist()] == [ref(x) for x in xs]


# ---------------------------------------------------------------- generation


def test_greedy_with_cache_matches_no_cache_reference(model64, monkeypatch):
    compactions = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache, "batch_select_indices", lambda c, i: compactions.append(len(i)) or select(c, i)
    )
    # EOS is a token the reference first emits mid-way for prompt 2, so rows stop at different steps.
    no_eos = reference_greedy(model64, PROMPTS[2], 8, eos=-1)[0]
    eos = next(tok for i, tok in enumerate(no_eos) if i >= 2 and tok not in no_eos[:i])
    r = run(model64, eos=eos, temperature=0, max_new_tokens=8)
    assert r.response_ids.shape[0] == len(PROMPTS)
    lengths = set()
    for i, prompt in enumerate(PROMPTS):
        tokens, logps = reference_greedy(model64, prompt, 8, eos)
        assert row_response(r, i) == tokens
        torch.testing.assert_close(
            r.sample_log_probs[i, : len(tokens)], torch.tensor(logps, dtype=torch.float64)
        )
        lengths.add(len(tokens))
    assert row_response(r, 2)[-1] == eos and len(lengths) > 1
    assert r.response_ids.shape[1] == max(lengths)
    assert compactions  # finished rows were dropped from the KV cache mid-generation


def test_sampling_is_deterministic_in_seed_and_step(model64):
    a = run(model64, step=3, temperature=1.0, n=2, max_new_tokens=6)
    b = run(model64, step=3, temperature=1.0, n=2, max_new_tokens=6)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.sample_log_probs, b.sample_log_probs)
    for other in (
        run(model64, step=4, temperature=1.0, n=2, max_new_tokens=6),
        run(model64, seed=1, step=3, temperature=1.0, n=2, max_new_tokens=6),
    ):
        assert not torch.equal(a.response_ids, other.response_ids)
    # the two samples of one prompt are different draws
    assert not torch.equal(a.response_ids[0::2], a.response_ids[1::2])


def test_samples_do_not_depend_on_batch_composition(model64):
    cfg = dict(temperature=1.0, top_p=0.95, n=3, max_new_tokens=10, eos=5)
    full = run(model64, **cfg)
    order = [4, 2, 0]
    shuffled = run(model64, [PROMPTS[i] for i in order], [KEYS[i] for i in order], **cfg)
    alone = run(model64, [PROMPTS[2]], [KEYS[2]], **cfg)
    single = run(model64, **{**cfg, "n": 1})  # sample 0 does not depend on how many samples are drawn
    for i in range(len(PROMPTS)):
        assert row_response(single, i) == row_response(full, 3 * i)
    assert len(set(full.response_lengths.tolist())) > 1  # rows finished at different steps
    for other, prompt_ids in ((shuffled, order), (alone, [2])):
        for j, i in enumerate(prompt_ids):
            for s in range(3):
                a, b = i * 3 + s, j * 3 + s
                assert int(other.keys[b]) == KEYS[i] and int(other.sample_index[b]) == s
                assert row_response(full, a) == row_response(other, b)
                n = int(full.response_lengths[a])
                torch.testing.assert_close(full.sample_log_probs[a, :n], other.sample_log_probs[b, :n])


def test_eos_stops_rows_and_masks_follow(model64):
    eos, max_new = 5, 15
    r = run(model64, eos=eos, temperature=1.0, n=4, max_new_tokens=max_new)
    assert r.response_ids.shape == r.response_mask.shape == r.sample_log_probs.shape
    saw_eos = saw_full = False
    for i in range(r.response_ids.shape[0]):
        n = int(r.response_lengths[i])
        ids, mask = r.response_ids[i].tolist(), r.response_mask[i].tolist()
        assert mask == [1] * n + [0] * (len(mask) - n)
        assert eos not in ids[: n - 1]  # nothing is generated after EOS
        assert all(t == PAD for t in ids[n:])
        assert (r.sample_log_probs[i, :n] < 0).all() and (r.sample_log_probs[i, n:] == 0).all()
        saw_eos |= ids[n - 1] == eos
        saw_full |= n == max_new and ids[n - 1] != eos
    assert saw_eos and saw_full
    assert r.group_ids.tolist() == [g for g in range(len(PROMPTS)) for _ in range(4)]
    assert r.prompt_mask.sum(-1).tolist() == [len(p) for p in PROMPTS for _ in range(4)]
    assert not r.sample_log_probs.requires_grad


def test_generation_stops_when_every_row_is_done():
    logits = torch.tensor([0.0, 0.0, 2.5, 0.0, 0.0, 0.0])  # EOS (2) has probability ~0.8
    model = FixedLogits(logits)
    greedy = generate(
        model,
        [[1, 3], [4]],
        keys=[0, 1],
        seed=0,
        step=0,
        pad_id=PAD,
        eos_id=2,
        cfg=SamplingConfig(temperature=0, max_new_tokens=50),
    )
    assert greedy.response_ids.tolist() == [[2], [2]] and model.calls == 1  # prefill only
    model.calls = 0
    sampled = generate(
        model,
        [[1, 3], [4]],
        keys=[0, 1],
        seed=0,
        step=0,
        pad_id=PAD,
        eos_id=2,
        cfg=SamplingConfig(temperature=1.0, max_new_tokens=50, n=8),
    )
    width = sampled.response_ids.shape[1]
    assert width < 50 and model.calls == width  # prefill + one decode per further step
    assert int(sampled.response_lengths.max()) == width


def test_tiny_top_p_and_zero_temperature_are_greedy(model64):
    greedy = run(model64, temperature=0, max_new_tokens=8, eos=5)
    narrow = run(model64, temperature=1.0, top_p=1e-6, max_new_tokens=8, eos=5)
    wide = run(model64, temperature=1.0, max_new_tokens=8, eos=5)
    assert torch.equal(greedy.response_ids, narrow.response_ids)
    torch.testing.assert_close(greedy.sample_log_probs, narrow.sample_log_probs)
    assert not torch.equal(greedy.response_ids, wide.response_ids)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_frequencies_match_the_softmax(top_p):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    temperature, rows, positions = 0.8, 3000, 2
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:  # the nucleus: most likely tokens until their mass reaches top_p
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        kept = torch.zeros_like(probs, dtype=torch.bool)
        kept[order[before < top_p]] = True
        assert 1 < int(kept.sum()) < len(probs)
        probs = torch.where(kept, probs, 0.0)
        probs /= probs.sum()
    r = generate(
        FixedLogits(logits),
        [[1]] * rows,
        keys=list(range(rows)),
        seed=3,
        step=0,
        pad_id=PAD,
        eos_id=99,
        cfg=SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=positions),
    )
    counts = torch.bincount(r.response_ids.flatten(), minlength=len(probs)).double()
    assert (counts[probs == 0] == 0).all()
    expected = probs[probs > 0] * rows * positions
    stat = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    assert stat < chi2.ppf(1 - 1e-6, df=len(expected) - 1)
    # positions draw independent noise: the two tokens of a row agree about as often as sum p^2
    agree = float((r.response_ids[:, 0] == r.response_ids[:, 1]).double().mean())
    assert abs(agree - float((probs**2).sum())) < 0.05
    torch.testing.assert_close(
        r.sample_log_probs[0, 0], torch.log_softmax(logits / temperature, -1)[r.response_ids[0, 0]]
    )


def test_nucleus_wider_than_the_first_top_k_guess():
    # 300 near-flat logits: a 0.9 nucleus holds far more than 64 tokens, and a ~1 nucleus all of them.
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    kw = dict(keys=list(range(400)), seed=1, step=0, pad_id=PAD, eos_id=999)
    prompts = [[1]] * 400
    full = generate(FixedLogits(logits), prompts, cfg=SamplingConfig(top_p=1.0, max_new_tokens=1), **kw)
    everything = generate(
        FixedLogits(logits), prompts, cfg=SamplingConfig(top_p=1 - 1e-9, max_new_tokens=1), **kw
    )
    assert torch.equal(
        full.response_ids, everything.response_ids
    )  # same noise per vocabulary id on both paths
    wide = generate(FixedLogits(logits), prompts, cfg=SamplingConfig(top_p=0.9, max_new_tokens=1), **kw)
    assert len(set(wide.response_ids.flatten().tolist())) > 64


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(temperature=float("inf")),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(max_new_tokens=0),
        dict(n=0),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingConfig(**kwargs)


def test_generate_rejects_bad_prompts(model64):
    with pytest.raises(ValueError, match="one key per prompt"):
        run(model64, keys=KEYS[:2])
    with pytest.raises(ValueError, match="distinct"):
        run(model64, keys=[1, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="non-empty"):
        run(model64, prompts=[[1], []], keys=[0, 1])


# ---------------------------------------------------------------- training view


def test_to_train_batch_layout():
    r = Rollout(
        prompt_ids=torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4]]),
        prompt_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
        response_ids=torch.tensor([[10, 11, 2], [12, 2, 0]]),
        response_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        sample_log_probs=torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, 0.0]]),
        group_ids=torch.tensor([0, 1]),
        keys=torch.tensor([7, 8]),
        sample_index=torch.tensor([0, 0]),
        response_lengths=torch.tensor([3, 2]),
    )
    b = to_train_batch(r, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 10, 11, 2, 0], [7, 8, 9, 4, 12, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert b.targets.tolist() == [[6, 10, 11, 2, 0, 0], [8, 9, 4, 12, 2, 0]]
    assert b.response_mask.tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]]
    torch.testing.assert_close(
        b.old_log_probs, torch.tensor([[0, -0.1, -0.2, -0.3, 0, 0], [0, 0, 0, -0.4, -0.5, 0]])
    )
    assert b.seq_ids.tolist() == [[0, 0, 0, 0, 0, -1], [1, 1, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [list(range(6))] * 2
    assert b.group_ids.tolist() == [0, 1]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (0.0, 1.0)])
def test_sample_log_probs_equal_training_log_probs(model64, temperature, top_p):
    r = run(model64, temperature=temperature, top_p=top_p, n=3, max_new_tokens=10, eos=5)
    b = to_train_batch(r, pad_id=PAD)
    mask = b.response_mask.bool()
    assert b.targets[mask].tolist() == r.response_ids[r.response_mask.bool()].tolist()
    log_probs, entropy = token_log_probs(model64, b, temperature, with_entropy=True)
    torch.testing.assert_close(log_probs[mask], b.old_log_probs[mask], rtol=0, atol=1e-10)
    full = model64(input_ids=b.input_ids, attention_mask=b.attention_mask).logits / (temperature or 1.0)
    ref_entropy = -(torch.softmax(full, -1) * torch.log_softmax(full, -1)).sum(-1)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask])
    (log_probs * mask).sum().backward()  # the trainer differentiates through it
    grad = model64.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model64.zero_grad(set_to_none=True)
