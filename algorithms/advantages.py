"""Advantage estimators: from token rewards (and, for GAE, values) to per-token advantages and returns.

Every estimator has one signature, so the trainer can pick one by name::

    fn(token_rewards, response_mask, group_ids, values, *, norm_by_std=True, eps=1e-6, gamma=1.0, lam=1.0)
        -> (advantages [B, T], returns [B, T])

Arguments an estimator does not use are ignored (GRPO ignores ``values``, ``gamma`` and ``lam``; GAE ignores
``group_ids``, ``norm_by_std`` and ``eps``). The conventions follow verl 0.9.1's ``core_algos`` except where a
comment says otherwise; tests/test_verl_oracle.py checks them against verl.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.registry import Registry

ADV_ESTIMATORS: Registry = Registry("advantage estimator")
register_adv_est = ADV_ESTIMATORS.register


def _check_inputs(
    token_rewards: Tensor, response_mask: Tensor, group_ids: Tensor, values: Tensor | None
) -> None:
    if not isinstance(token_rewards, Tensor) or token_rewards.dim() != 2:
        raise ValueError(
            f"token_rewards must be a 2-D tensor [batch, response_length], got "
            f"{getattr(token_rewards, 'shape', type(token_rewards).__name__)}"
        )
    if not token_rewards.is_floating_point():
        raise ValueError(f"token_rewards must be a floating-point tensor, got dtype {token_rewards.dtype}")
    if not isinstance(response_mask, Tensor) or response_mask.shape != token_rewards.shape:
        raise ValueError(
            f"response_mask must have the shape of token_rewards {tuple(token_rewards.shape)}, got "
            f"{tuple(getattr(response_mask, 'shape', ()))}"
        )
    if not isinstance(group_ids, Tensor) or group_ids.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"group_ids must be a 1-D tensor with one id per sequence ({token_rewards.shape[0]}), got "
            f"{tuple(getattr(group_ids, 'shape', ()))}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if values is not None and (not isinstance(values, Tensor) or values.shape != token_rewards.shape):
        raise ValueError(
            f"values must have the shape of token_rewards {tuple(token_rewards.shape)}, got "
            f"{tuple(getattr(values, 'shape', ()))}"
        )


@register_adv_est("grpo")
def grpo_advantage(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Group-relative outcome advantage (GRPO; Dr.GRPO with ``norm_by_std=False``).

    Each sequence's score is the sum of its token rewards. Within a group of sequences sharing a
    ``group_ids`` value the advantage is ``(score - group mean) / (group std + eps)``, with the unbiased std
    (Bessel's correction, as ``torch.std`` in verl) and ``eps`` added to the std, not the variance. The scalar
    is broadcast over the response and zeroed outside ``response_mask``. Returns are the advantages (verl).

    Group of one: its own mean is its score, so its advantage is 0 (no baseline, no signal).
    verl 0.9.1 differs here: it sets mean 0, std 1 for a singleton, which hands back the raw score / (1 + eps).
    We choose 0 so a lone sample never contributes an un-baselined REINFORCE term to a "group-relative"
    update; every group of two or more matches verl exactly.
    """
    _check_inputs(token_rewards, response_mask, group_ids, values)
    with torch.no_grad():
        scores = token_rewards.sum(dim=-1)
        # Arbitrary ids (e.g. prompt hashes) -> dense 0..G-1, so index_add works without a Python loop.
        unique_ids, dense = torch.unique(group_ids, return_inverse=True)
        n_groups = unique_ids.numel()
        count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
            0, dense, torch.ones_like(scores)
        )
        mean = torch.zeros_like(count).index_add_(0, dense, scores) / count
        centred = scores - mean[dense]
        if norm_by_std:
            # Two-pass variance (sum of squared deviations) to agree with torch.std to rounding.
            sq_dev = torch.zeros_like(count).index_add_(0, dense, centred * centred)
            std = torch.sqrt(sq_dev / (count - 1).clamp(min=1))
            centred = centred / (std[dense] + eps)
        advantages = centred.unsqueeze(-1) * response_mask.to(scores.dtype)
    return advantages, advantages


@register_adv_est("gae")
def gae_advantage(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015), as verl's ``compute_gae_advantage_return``.

    Positions outside ``response_mask`` (padding, or observation tokens between turns) are skipped: they
    carry neither a TD error nor a value, so the recursion jumps over them. Returns are the raw (unwhitened)
    advantages plus ``values``; the advantages are then whitened over the masked tokens of the whole batch
    (mean 0, unbiased variance 1, ``rsqrt(var + 1e-8)``) as verl always does for GAE.

    Differs from verl only outside the mask: verl leaves whitened garbage and ``values`` there, we write 0 to
    both so that downstream statistics taken without a mask cannot pick them up. The whitening needs at
    least two response tokens in the batch.
    """
    _check_inputs(token_rewards, response_mask, group_ids, values)
    if values is None:
        raise ValueError("the 'gae' advantage estimator needs values from a critic; got values=None")
    with torch.no_grad():
        mask = response_mask.to(token_rewards.dtype)
        n_tokens = int(mask.sum().item())
        if n_tokens < 2:
            raise ValueError(f"GAE whitening needs at least 2 response tokens in the batch, got {n_tokens}")
        values = values.to(token_rewards.dtype)
        next_value = torch.zeros_like(token_rewards[:, 0])
        last_gae = torch.zeros_like(next_value)
        reversed_adv = []
        for t in reversed(range(token_rewards.shape[1])):
            delta = token_rewards[:, t] + gamma * next_value - values[:, t]
            gae_t = delta + gamma * lam * last_gae
            m = mask[:, t]
            next_value = values[:, t] * m + (1 - m) * next_value
            last_gae = gae_t * m + (1 - m) * last_gae
            reversed_adv.append(last_gae)
        advantages = torch.stack(reversed_adv[::-1], dim=1)
        returns = (advantages + values) * mask

        # Same constants as verl's masked_mean / masked_var / masked_whiten.
        mean = (advantages * mask).sum() / (mask.sum() + 1e-8)
        var = ((advantages - mean) ** 2 * mask).sum() / (mask.sum() + 1e-8)
        var = var * n_tokens / (n_tokens - 1)
        advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
    return advantages, returns
