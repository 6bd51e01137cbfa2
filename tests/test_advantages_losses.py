"""Properties of algorithms/advantages.py and algorithms/losses.py that verl does not check for us:
hand-derived gradients, micro-batch accumulation, hand-computed GAE, and error messages."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.testing import assert_close

from algorithms.advantages import ADV_ESTIMATORS
from algorithms.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    value_loss,
)
from algorithms.registry import UnknownNameError

DT = torch.float64
TOKEN_MEAN = functools.partial(agg_loss, mode="token-mean")


def _toy_policy(seed: int, batch: int = 4, length: int = 6, vocab: int = 5):
    """Logits as the leaf parameter, sampled actions, their log-probs, and a ragged response mask."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=DT, requires_grad=True)
    actions = torch.randint(0, vocab, (batch, length), generator=gen)
    lengths = torch.tensor([length, 2, 4, 1])[:batch]
    mask = (torch.arange(length) < lengths.unsqueeze(1)).to(DT)
    log_prob = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    advantages = torch.randn(batch, length, generator=gen, dtype=DT)
    return logits, actions, log_prob, mask, advantages


def _grad_logp_by_hand(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    # d log softmax(z)[a] / dz = onehot(a) - softmax(z)
    onehot = torch.nn.functional.one_hot(actions, logits.shape[-1]).to(DT)
    return onehot - torch.softmax(logits.detach(), -1)


def test_vanilla_on_policy_gradient_is_reinforce() -> None:
    logits, actions, log_prob, mask, adv = _toy_policy(0)
    loss, metrics = POLICY_LOSSES.get("vanilla")(log_prob, log_prob.detach(), adv, mask, agg=TOKEN_MEAN)
    loss.backward()
    # loss = -mean_t A_t * ratio_t with ratio = 1 and d ratio = d logp, so grad = -A * d logp / N_tokens.
    expected = -(adv * mask / mask.sum()).unsqueeze(-1) * _grad_logp_by_hand(logits, actions)
    assert_close(logits.grad, expected, rtol=1e-12, atol=1e-12)
    assert metrics["clip_frac"] == 0 and abs(metrics["approx_kl"]) < 1e-15


def test_vanilla_off_policy_gradient_carries_the_ratio() -> None:
    logits, actions, log_prob, mask, adv = _toy_policy(1)
    old = log_prob.detach() + 0.3
    loss, metrics = POLICY_LOSSES.get("vanilla")(log_prob, old, adv, mask, agg=TOKEN_MEAN)
    loss.backward()
    ratio = torch.exp(log_prob.detach() - old)
    expected = -(adv * ratio * mask / mask.sum()).unsqueeze(-1) * _grad_logp_by_hand(logits, actions)
    assert_close(logits.grad, expected, rtol=1e-12, atol=1e-12)
    assert_close(metrics["approx_kl"], torch.tensor(0.3, dtype=DT), rtol=1e-6, atol=1e-6)


def test_cispo_gradient_uses_the_clipped_ratio_as_a_constant_weight() -> None:
    logits, actions, log_prob, mask, adv = _toy_policy(2)
    shift = torch.tensor([0.5, -0.5, 0.05, 0.0, -0.05, 0.5], dtype=DT)  # ratio beyond and within the clip
    old = log_prob.detach() - shift
    loss, metrics = POLICY_LOSSES.get("cispo")(
        log_prob, old, adv, mask, agg=TOKEN_MEAN, clip_ratio_low=0.2, clip_ratio_high=0.3
    )
    loss.backward()
    weight = torch.exp(shift).clamp(0.8, 1.3).expand_as(adv)
    expected = -(weight * adv * mask / mask.sum()).unsqueeze(-1) * _grad_logp_by_hand(logits, actions)
    assert_close(logits.grad, expected, rtol=1e-12, atol=1e-12)
    # No token loses its gradient, unlike PPO: every valid row/position has a non-zero one.
    assert torch.all(logits.grad.abs().sum(-1)[mask.bool()] > 0)
    clipped = (torch.exp(shift) != weight[0]).to(DT).expand_as(adv)
    assert_close(metrics["clip_frac"], (clipped * mask).sum() / mask.sum(), rtol=1e-6, atol=1e-9)


def test_ppo_clip_zeroes_gradient_exactly_where_clipped() -> None:
    logits, actions, log_prob, mask, _ = _toy_policy(3)
    log_shift = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 4.0, 1.0], dtype=DT))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=DT).expand_as(log_prob)
    loss, metrics = POLICY_LOSSES.get("ppo_clip")(
        log_prob, log_prob.detach() - log_shift, adv, mask, agg=TOKEN_MEAN, clip_ratio_c=3.0
    )
    loss.backward()
    # ratio 1.5, A>0: upper clip, no grad | ratio 1.5, A<0: unclipped | ratio 0.5, A>0: unclipped |
    # ratio 0.5, A<0: lower clip, no grad | ratio 4, A<0: dual clip at 3, no grad | ratio 1: unclipped.
    live = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=DT).expand_as(adv)
    ratio = torch.exp(log_shift).expand_as(adv)
    expected = -(live * adv * ratio * mask / mask.sum()).unsqueeze(-1) * _grad_logp_by_hand(logits, actions)
    assert_close(logits.grad, expected, rtol=1e-12, atol=1e-12)
    n = mask.sum()
    # The clipped term wins on columns 0 and 3; on column 4 the unclipped 4 beats 1.2 but the dual bound 3 wins.
    assert_close(metrics["clip_frac"], (mask[:, [0, 3]].sum()) / n, rtol=1e-6, atol=1e-9)
    assert_close(metrics["clip_frac_lower"], mask[:, 4].sum() / n, rtol=1e-6, atol=1e-9)


def _ragged_batch(seed: int, batch: int = 10, length: int = 12):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0], lengths[1], lengths[3] = length, 0, 5
    mask = (torch.arange(length) < lengths.unsqueeze(1)).to(DT)
    return torch.randn(batch, length, generator=gen, dtype=DT), mask


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_sum_equals_mini_batch_aggregate(mode: str) -> None:
    loss_mat, mask = _ragged_batch(7)
    whole = agg_loss(loss_mat, mask, mode)
    denoms = {
        "num_tokens": mask.sum().item(),
        "num_seqs": (mask.sum(-1) > 0).sum().item(),
        "norm_len": mask.shape[-1],
    }
    accumulated = torch.zeros((), dtype=DT)
    naive = torch.zeros((), dtype=DT)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 10)):
        micro_mask = mask[rows]
        # Micro-batches are re-padded to their own longest sequence, as a trainer would.
        width = max(int(micro_mask.sum(-1).max()), 1)
        accumulated = accumulated + agg_loss(loss_mat[rows, :width], micro_mask[:, :width], mode, **denoms)
        naive = naive + agg_loss(loss_mat[rows, :width], micro_mask[:, :width], mode) / 3
    assert_close(accumulated, whole, rtol=1e-12, atol=1e-12)
    # The global denominators matter: averaging per-micro-batch aggregates gives something else.
    assert not torch.isclose(naive, whole)


def test_sequence_modes_drop_empty_sequences_and_token_mean_weights_tokens() -> None:
    loss_mat = torch.tensor([[1.0, 3.0, 100.0], [5.0, 100.0, 100.0], [100.0, 100.0, 100.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=DT)
    assert agg_loss(loss_mat, mask, "token-mean").item() == pytest.approx(9 / 3)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx((4 + 5) / 2)
    assert agg_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 5) / 2)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum-norm").item() == pytest.approx((4 + 5) / 2 / 3)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", norm_len=10).item() == pytest.approx(0.45)


def test_padding_nan_does_not_leak_into_the_loss() -> None:
    loss_mat = torch.tensor([[1.0, float("nan")], [2.0, 4.0]], dtype=DT)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=DT)
    for mode in AGG_MODES:
        assert torch.isfinite(agg_loss(loss_mat, mask, mode)), mode


def test_grpo_group_of_one_gets_zero_and_leaves_other_groups_alone() -> None:
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0], [2.0, 0.0]], dtype=DT)
    mask = torch.ones_like(rewards)
    group_ids = torch.tensor([5, 5, 9, 5])
    adv, returns = ADV_ESTIMATORS.get("grpo")(rewards, mask, group_ids, None)
    assert torch.all(adv[2] == 0)
    scores = torch.tensor([1.0, 0.0, 2.0], dtype=DT)
    expected = (scores - 1.0) / (scores.std() + 1e-6)
    assert_close(adv[[0, 1, 3], 0], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(adv, returns)


def test_grpo_is_invariant_to_group_labels_and_equivariant_to_batch_order() -> None:
    gen = torch.Generator().manual_seed(11)
    rewards = torch.randn(12, 5, generator=gen, dtype=DT)
    mask = (torch.arange(5) < torch.randint(1, 6, (12,), generator=gen).unsqueeze(1)).to(DT)
    group_ids = torch.arange(12) % 3
    grpo = ADV_ESTIMATORS.get("grpo")
    adv, _ = grpo(rewards, mask, group_ids, None)
    relabelled, _ = grpo(rewards, mask, group_ids * 1_000_003 - 7, None)
    assert_close(relabelled, adv, rtol=0, atol=0)
    perm = torch.randperm(12, generator=gen)
    permuted, _ = grpo(rewards[perm], mask[perm], group_ids[perm], None)
    assert_close(permuted, adv[perm], rtol=1e-12, atol=1e-12)
    assert torch.all(adv[mask == 0] == 0)
    per_seq = adv[:, 0]
    for g in range(3):
        group = per_seq[group_ids == g]
        assert abs(group.mean().item()) < 1e-12
        assert group.std().item() == pytest.approx(1.0, abs=1e-5)  # std / (std + eps)
    dr_grpo, _ = grpo(rewards, mask, group_ids, None, norm_by_std=False)
    scores = rewards.sum(-1)
    for g in range(3):
        sel = group_ids == g
        assert_close(dr_grpo[sel, 0], scores[sel] - scores[sel].mean(), rtol=1e-12, atol=1e-12)


def test_grpo_does_not_track_gradients() -> None:
    rewards = torch.randn(4, 3, dtype=DT, requires_grad=True)
    adv, _ = ADV_ESTIMATORS.get("grpo")(rewards, torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), None)
    assert not adv.requires_grad


def test_gae_returns_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]], dtype=DT)
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, -1.0, 9.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=DT)
    gae = ADV_ESTIMATORS.get("gae")
    # gamma = lam = 1: returns are the undiscounted reward-to-go, whatever the values.
    _, returns = gae(rewards, mask, torch.arange(2), values)
    assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [2.5, 2.0, 0.0]], dtype=DT), rtol=1e-12, atol=1e-12)
    # lam = 0: one-step TD targets r_t + gamma * V_{t+1}, with V = 0 past the end of the response.
    _, returns = gae(rewards, mask, torch.arange(2), values, gamma=0.5, lam=0.0)
    expected = torch.tensor([[0.5 * 0.4, 0.5 * 0.6, 1.0], [0.5 + 0.5 * -1.0, 2.0, 0.0]], dtype=DT)
    assert_close(returns, expected, rtol=1e-12, atol=1e-12)
    adv, _ = gae(rewards, mask, torch.arange(2), values, gamma=0.5, lam=0.0)
    on = mask.bool()
    # Not exactly 0 / 1: verl's masked mean divides by (count + 1e-8).
    assert abs(adv[on].mean().item()) < 1e-8 and adv[on].std().item() == pytest.approx(1.0, rel=1e-6)


def test_gae_needs_values() -> None:
    with pytest.raises(ValueError, match="needs values"):
        ADV_ESTIMATORS.get("gae")(torch.zeros(2, 3), torch.ones(2, 3), torch.arange(2), None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"response_mask": torch.ones(2, 4)}, "response_mask"),
        ({"group_ids": torch.arange(3)}, "group_ids"),
        ({"group_ids": torch.zeros(2)}, "integer"),
        ({"token_rewards": torch.zeros(6)}, "2-D"),
        ({"values": torch.zeros(2, 4)}, "values"),
    ],
)
def test_estimators_reject_bad_shapes(kwargs: dict, match: str) -> None:
    args = {
        "token_rewards": torch.zeros(2, 3),
        "response_mask": torch.ones(2, 3),
        "group_ids": torch.arange(2),
        "values": torch.zeros(2, 3),
    }
    args.update(kwargs)
    for name in ("grpo", "gae"):
        with pytest.raises(ValueError, match=match):
            ADV_ESTIMATORS.get(name)(
                args["token_rewards"], args["response_mask"], args["group_ids"], args["values"]
            )


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        ADV_ESTIMATORS.get("rloo")
    assert "gae" in str(err.value) and "grpo" in str(err.value)
    with pytest.raises(UnknownNameError) as err:
        POLICY_LOSSES.get("gspo")
    assert all(name in str(err.value) for name in ("cispo", "ppo_clip", "vanilla"))
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-sum-norm"):
        agg_loss(torch.zeros(2, 2), torch.ones(2, 2), "token-sum")
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(torch.zeros(2, 2), torch.zeros(2, 2), "low_var_kl")


def test_loss_argument_errors() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        POLICY_LOSSES.get("ppo_clip")(z, z, z, z + 1, agg=TOKEN_MEAN, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="advantages"):
        POLICY_LOSSES.get("vanilla")(z, z, torch.zeros(2, 4), z + 1, agg=TOKEN_MEAN)
    with pytest.raises(ValueError, match="num_tokens"):
        agg_loss(z, z + 1, "token-mean", num_tokens=0)
    with pytest.raises(ValueError, match="mask"):
        agg_loss(z, torch.ones(3, 2), "token-mean")
    with pytest.raises(ValueError, match="cliprange_value"):
        value_loss(z, z, z, z + 1, agg=TOKEN_MEAN, cliprange_value=-1.0)


def test_kl_estimators() -> None:
    gen = torch.Generator().manual_seed(3)
    log_prob = -torch.rand(4, 5, generator=gen, dtype=DT)
    ref = log_prob + 0.3 * torch.randn(4, 5, generator=gen, dtype=DT)
    assert_close(kl_penalty(log_prob, ref, "k1"), log_prob - ref, rtol=0, atol=0)
    k3 = kl_penalty(log_prob, ref, "k3")
    assert torch.all(k3 >= 0)
    assert torch.all(kl_penalty(log_prob, log_prob, "k3") == 0)
    # Large log-ratios are clamped, so the penalty stays bounded and finite.
    huge = kl_penalty(torch.zeros(1, 1, dtype=DT), torch.full((1, 1), 50.0, dtype=DT), "k3")
    assert huge.item() == 10.0


def test_entropy_properties() -> None:
    assert_close(entropy_from_logits(torch.zeros(2, 7, dtype=DT)), torch.full((2,), math.log(7), dtype=DT))
    logits = torch.tensor([[2.0, -1.0, float("-inf"), 0.5]], dtype=DT, requires_grad=True)
    ent = entropy_from_logits(logits)
    p = torch.softmax(torch.tensor([2.0, -1.0, 0.5], dtype=DT), -1)
    assert_close(ent, -(p * p.log()).sum().unsqueeze(0), rtol=1e-12, atol=1e-12)
    ent.sum().backward()
    assert torch.all(torch.isfinite(logits.grad))
    peaked = torch.tensor([[500.0, 0.0, 0.0]], dtype=torch.float32)
    assert 0 <= entropy_from_logits(peaked).item() < 1e-6


def test_value_loss_without_clipping_is_half_mse() -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(3, 4, generator=gen, dtype=DT, requires_grad=True)
    returns = torch.randn(3, 4, generator=gen, dtype=DT)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=DT)
    loss, metrics = value_loss(values, values.detach(), returns, mask, agg=TOKEN_MEAN, cliprange_value=1e6)
    expected = 0.5 * (((values.detach() - returns) ** 2) * mask).sum() / mask.sum()
    assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert metrics["clip_frac"] == 0
    # Moving 10 towards returns 20 away, a 0.1 clip keeps the larger clipped error: no gradient, all clipped.
    old = values.detach()
    moved = (old + 10.0).requires_grad_(True)
    loss, metrics = value_loss(moved, old, old + 20.0, mask, agg=TOKEN_MEAN, cliprange_value=0.1)
    loss.backward()
    assert metrics["clip_frac"] == pytest.approx(1.0)
    assert torch.all(moved.grad == 0)
    assert loss.item() == pytest.approx(0.5 * 19.9**2)
