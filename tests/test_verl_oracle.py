"""verl 0.9.1 as the oracle for algorithms/advantages.py and algorithms/losses.py.

verl is imported here only; the code under test never imports it. All comparisons run in float64 on one CPU
process with random masks of unequal lengths, several seeds, and groups of 4-8 sequences.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

from algorithms.advantages import ADV_ESTIMATORS
from algorithms.losses import AGG_MODES, POLICY_LOSSES, agg_loss, entropy_from_logits, kl_penalty, value_loss

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
from verl.workers.config import ActorConfig  # noqa: E402  (after the importorskip that guards verl)

SEEDS = [0, 1, 2]
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
DT = torch.float64


def _right_padded_mask(gen: torch.Generator, batch: int, length: int, allow_empty: bool) -> torch.Tensor:
    low = 0 if allow_empty else 1
    lengths = torch.randint(low, length + 1, (batch,), generator=gen)
    lengths[0] = length  # at least one full-length row so T is the real maximum
    if allow_empty:
        lengths[-1] = 0  # and one empty row, which the sequence modes must drop
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(DT)


def _groups(gen: torch.Generator, n_groups: int = 3) -> torch.Tensor:
    """Shuffled, non-contiguous group ids (like prompt hashes), each group of size 4-8."""
    sizes = torch.randint(4, 9, (n_groups,), generator=gen)
    labels = torch.randperm(10_000, generator=gen)[:n_groups] + 1000
    ids = torch.repeat_interleave(labels, sizes)
    return ids[torch.randperm(ids.numel(), generator=gen)]


def _grpo_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    group_ids = _groups(gen)
    batch, length = group_ids.numel(), int(torch.randint(5, 13, (1,), generator=gen))
    mask = _right_padded_mask(gen, batch, length, allow_empty=False)
    if seed % 2 == 0:
        # Outcome reward on the last response token, binary, so some groups tie and some have std 0.
        rewards = torch.zeros(batch, length, dtype=DT)
        last = mask.sum(-1).long() - 1
        rewards[torch.arange(batch), last] = torch.randint(0, 2, (batch,), generator=gen).to(DT)
    else:
        rewards = torch.randn(batch, length, generator=gen, dtype=DT) * mask
    return rewards, mask, group_ids


def _actor_config(low: float = 0.15, high: float = 0.28, c: float = 3.0) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=c,
    )


def _policy_batch(seed: int):
    gen = torch.Generator().manual_seed(100 + seed)
    batch, length = 12, 9
    mask = _right_padded_mask(gen, batch, length, allow_empty=True)
    old = -torch.rand(batch, length, generator=gen, dtype=DT) * 3
    log_prob = old + 0.4 * torch.randn(batch, length, generator=gen, dtype=DT)
    # A few tokens far off-policy, so the dual clip (ratio > clip_ratio_c with A < 0) really triggers.
    log_prob[:, 1] = old[:, 1] + 2.0
    advantages = torch.randn(batch, length, generator=gen, dtype=DT)
    advantages[:, 1] = -advantages[:, 1].abs()
    log_prob[0, 2] = old[0, 2] + 25.0  # beyond verl's +-20 clamp of the log ratio
    return log_prob, old, advantages, mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_verl(seed: int, norm_by_std: bool) -> None:
    rewards, mask, group_ids = _grpo_batch(seed)
    ours, ours_ret = ADV_ESTIMATORS.get("grpo")(
        rewards, mask, group_ids, None, norm_by_std=norm_by_std, eps=1e-6
    )
    theirs, theirs_ret = core_algos.compute_grpo_outcome_advantage(
        rewards.clone(), mask, group_ids.numpy(), epsilon=1e-6, norm_adv_by_std_in_grpo=norm_by_std
    )
    assert_close(ours, theirs, **TIGHT)
    assert_close(ours_ret, theirs_ret, **TIGHT)
    assert ours.abs().sum() > 0  # the data really has groups with spread


def test_grpo_singleton_group_is_our_documented_difference_from_verl() -> None:
    rewards, mask, group_ids = _grpo_batch(1)
    group_ids = torch.cat([group_ids, torch.tensor([7])])
    rewards = torch.cat([rewards, torch.full((1, rewards.shape[1]), 0.5, dtype=DT)])
    mask = torch.cat([mask, torch.ones(1, mask.shape[1], dtype=DT)])
    ours, _ = ADV_ESTIMATORS.get("grpo")(rewards, mask, group_ids, None)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, group_ids.numpy())
    assert_close(ours[:-1], theirs[:-1], **TIGHT)
    assert torch.all(ours[-1] == 0)
    # verl treats a singleton as mean 0, std 1 (float32 constants, hence the looser tolerance): the raw
    # score comes back.
    assert_close(theirs[-1], torch.full_like(theirs[-1], 0.5 * mask.shape[1]), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_verl(seed: int, gamma: float, lam: float, holes: bool) -> None:
    gen = torch.Generator().manual_seed(200 + seed)
    batch, length = 6, 10
    mask = _right_padded_mask(gen, batch, length, allow_empty=False)
    if holes:  # multi-turn: observation tokens inside the response are masked out
        mask[:, 3:5] = 0
    rewards = torch.randn(batch, length, generator=gen, dtype=DT) * mask
    values = torch.randn(batch, length, generator=gen, dtype=DT)
    group_ids = torch.arange(batch)
    ours, ours_ret = ADV_ESTIMATORS.get("gae")(rewards, mask, group_ids, values, gamma=gamma, lam=lam)
    theirs, theirs_ret = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    on = mask.bool()
    assert_close(ours[on], theirs[on], **TIGHT)
    assert_close(ours_ret[on], theirs_ret[on], **TIGHT)
    # Outside the mask we write zeros where verl leaves values; documented in gae_advantage.
    assert torch.all(ours[~on] == 0) and torch.all(ours_ret[~on] == 0)


def _global_info(mask: torch.Tensor, norm_len: int) -> tuple[dict, dict]:
    n_tok = float(mask.sum())
    n_seq = float((mask.sum(-1) > 0).sum())
    ours = {"num_tokens": n_tok, "num_seqs": n_seq, "norm_len": norm_len}
    theirs = {
        "dp_size": 1,
        "batch_num_tokens": n_tok,
        "global_batch_size": n_seq,
        "loss_scale_factor": norm_len,
    }
    return ours, theirs


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_matches_verl(seed: int, mode: str) -> None:
    gen = torch.Generator().manual_seed(300 + seed)
    # One column of pure padding, so T (the default Dr.GRPO constant) exceeds the longest response.
    mask = torch.cat([_right_padded_mask(gen, 7, 10, allow_empty=True), torch.zeros(7, 1, dtype=DT)], dim=1)
    loss_mat = torch.randn(7, 11, generator=gen, dtype=DT)
    assert_close(agg_loss(loss_mat, mask, mode), core_algos.agg_loss(loss_mat, mask, mode), **TIGHT)
    # Explicit denominators map onto verl's global-batch arguments (here deliberately not this batch's).
    ours_kw, theirs_kw = _global_info(torch.cat([mask, mask[:3]]), norm_len=32)
    assert_close(
        agg_loss(loss_mat, mask, mode, **ours_kw),
        core_algos.agg_loss(loss_mat, mask, mode, **theirs_kw),
        **TIGHT,
    )


def _run_both(name_ours: str, name_verl: str, seed: int, mode: str, global_denoms: bool):
    log_prob, old, adv, mask = _policy_batch(seed)
    cfg = _actor_config()
    agg_kw = {}
    if global_denoms:
        agg_kw, verl_info = _global_info(torch.cat([mask, mask]), norm_len=20)
        # The field is frozen but its dict is not; verl's own trainer fills it the same way.
        cfg.global_batch_info.update(verl_info)
    lp_ours = log_prob.clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES.get(name_ours)(
        lp_ours,
        old,
        adv,
        mask,
        agg=functools.partial(agg_loss, mode=mode, **agg_kw),
        clip_ratio_low=cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        clip_ratio_c=cfg.clip_ratio_c,
    )
    loss.backward()
    lp_verl = log_prob.clone().requires_grad_(True)
    verl_loss, verl_metrics = core_algos.get_policy_loss_fn(name_verl)(old, lp_verl, adv, mask, mode, cfg)
    verl_loss.backward()
    assert_close(loss, verl_loss, **TIGHT)
    assert_close(lp_ours.grad, lp_verl.grad, **TIGHT)
    return metrics, verl_metrics


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_denoms", [False, True])
def test_ppo_clip_matches_verl_vanilla(seed: int, mode: str, global_denoms: bool) -> None:
    metrics, verl_metrics = _run_both("ppo_clip", "vanilla", seed, mode, global_denoms)
    assert_close(metrics["clip_frac"].item(), verl_metrics["actor/pg_clipfrac"], **TIGHT)
    assert_close(metrics["clip_frac_lower"].item(), verl_metrics["actor/pg_clipfrac_lower"], **TIGHT)
    assert_close(metrics["approx_kl"].item(), verl_metrics["actor/ppo_kl"], **TIGHT)
    # The data exercises both clips, so the comparison covers them.
    assert 0 < metrics["clip_frac"] < 1 and metrics["clip_frac_lower"] > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_denoms", [False, True])
def test_cispo_matches_verl(seed: int, mode: str, global_denoms: bool) -> None:
    metrics, verl_metrics = _run_both("cispo", "cispo", seed, mode, global_denoms)
    assert_close(metrics["clip_frac"].item(), verl_metrics["actor/pg_clipfrac"], **TIGHT)
    assert_close(metrics["clip_frac_lower"].item(), verl_metrics["actor/pg_clipfrac_lower"], **TIGHT)
    assert_close(metrics["approx_kl"].item(), verl_metrics["actor/ppo_kl"], **TIGHT)
    assert 0 < metrics["clip_frac"] < 1


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_penalty_matches_verl(seed: int) -> None:
    gen = torch.Generator().manual_seed(400 + seed)
    log_prob = -torch.rand(5, 8, generator=gen, dtype=DT) * 4
    ref = log_prob + torch.randn(5, 8, generator=gen, dtype=DT)
    ref[0, :3] = log_prob[0, :3] + torch.tensor([30.0, -30.0, 12.0], dtype=DT)  # hit both k3 clamps
    for ours_kind, verl_kinds in (("k1", ("kl", "k1")), ("k3", ("low_var_kl", "k3"))):
        ours = kl_penalty(log_prob, ref, ours_kind)
        for verl_kind in verl_kinds:
            assert_close(ours, core_algos.kl_penalty(log_prob, ref, verl_kind), **TIGHT)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_matches_verl(seed: int, mode: str) -> None:
    gen = torch.Generator().manual_seed(500 + seed)
    mask = _right_padded_mask(gen, 8, 10, allow_empty=True)
    old_values = torch.randn(8, 10, generator=gen, dtype=DT)
    values = old_values + torch.randn(8, 10, generator=gen, dtype=DT)
    returns = torch.randn(8, 10, generator=gen, dtype=DT)
    loss, metrics = value_loss(
        values, old_values, returns, mask, agg=functools.partial(agg_loss, mode=mode), cliprange_value=0.5
    )
    verl_loss, verl_clipfrac = core_algos.compute_value_loss(values, returns, old_values, mask, 0.5, mode)
    assert_close(loss, verl_loss, **TIGHT)
    assert_close(metrics["clip_frac"], verl_clipfrac, **TIGHT)
    assert 0 < metrics["clip_frac"] < 1


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_matches_verl(seed: int) -> None:
    gen = torch.Generator().manual_seed(600 + seed)
    logits = torch.randn(3, 5, 17, generator=gen, dtype=DT) * 4
    assert_close(entropy_from_logits(logits), verl_F.entropy_from_logits(logits), **TIGHT)
