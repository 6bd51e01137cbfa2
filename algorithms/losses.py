"""Loss aggregation, policy losses, KL penalties, entropy and the critic's value loss.

Conventions follow verl 0.9.1's ``verl.trainer.ppo.core_algos`` wherever it has one (clamps, epsilons, the
0.5 in the value loss, the Dr.GRPO length constant); tests/test_verl_oracle.py checks each against verl.
Where we differ, the comment at that spot says so.

Every policy loss has one signature, so the trainer can pick one by name::

    fn(log_prob, old_log_prob, advantages, response_mask, *, agg, clip_ratio_low=0.2, clip_ratio_high=0.2,
       clip_ratio_c=3.0) -> (loss, metrics)

``agg(loss_mat, mask)`` is ``functools.partial(agg_loss, mode=..., num_tokens=..., num_seqs=..., norm_len=...)``
so the trainer, which knows the mini-batch, fixes the mode and the denominators. ``metrics`` always holds
the same detached 0-dim tensors: ``clip_frac``, ``clip_frac_lower`` and ``approx_kl``.

Name clash to keep in mind: verl's policy loss called "vanilla" is clipped PPO, which is our "ppo_clip";
our "vanilla" is the unclipped importance-weighted policy gradient (REINFORCE when on-policy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from algorithms.registry import Registry

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k3")

# verl clamps the log importance ratio to this range before exp(), so one wild token cannot overflow.
_LOG_RATIO_CLAMP = 20.0

AggFn = Callable[[Tensor, Tensor], Tensor]


def _check_same_shape(**tensors: Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    if not isinstance(first, Tensor) or first.dim() != 2:
        raise ValueError(
            f"{names[0]} must be a 2-D tensor [batch, response_length], got "
            f"{getattr(first, 'shape', type(first).__name__)}"
        )
    for name in names[1:]:
        t = tensors[name]
        if not isinstance(t, Tensor) or t.shape != first.shape:
            raise ValueError(
                f"{name} must have the shape of {names[0]} {tuple(first.shape)}, got "
                f"{tuple(getattr(t, 'shape', ())) if isinstance(t, Tensor) else type(t).__name__}"
            )


def _masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # where() first so a NaN/inf in a padded position cannot leak through 0 * NaN.
    valid = torch.where(mask.bool(), values * mask, torch.zeros_like(values))
    return valid.sum() if dim is None else valid.sum(dim=dim)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # The 1e-8 is verl's masked_mean; it makes an empty mask give 0 rather than NaN.
    return _masked_sum(values, mask) / (mask.sum() + 1e-8)


def _check_positive(name: str, value: float | Tensor | None) -> None:
    # Tensors are left alone: checking them would force a device sync inside the training loop.
    if value is not None and not isinstance(value, Tensor) and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    norm_len: float | None = None,
) -> Tensor:
    """Reduce a per-token loss matrix [B, T] to a scalar.

    Modes (as verl's ``agg_loss``):
      * ``token-mean``: sum over valid tokens / ``num_tokens``.
      * ``seq-mean-token-sum``: per-sequence token sum, summed over non-empty sequences / ``num_seqs``.
      * ``seq-mean-token-mean``: per-sequence token mean, summed over non-empty sequences / ``num_seqs``.
      * ``seq-mean-token-sum-norm``: ``seq-mean-token-sum`` / ``norm_len`` (Dr.GRPO's constant).

    With the denominators left ``None`` they come from this batch: ``num_tokens`` = valid tokens,
    ``num_seqs`` = sequences with at least one valid token, ``norm_len`` = T (``mask.shape[-1]``); this equals
    verl's ``agg_loss`` with ``dp_size=1``. A trainer that splits a mini-batch into micro-batches and sums
    their losses passes the mini-batch's counts (and one fixed ``norm_len``), so the sum over micro-batches
    equals this function on the whole mini-batch. An empty mask with batch denominators gives 0 / 0 = NaN,
    as in verl.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    _check_same_shape(loss_mat=loss_mat, mask=mask)
    _check_positive("num_tokens", num_tokens)
    _check_positive("num_seqs", num_seqs)
    _check_positive("norm_len", norm_len)
    mask = mask.to(loss_mat.dtype)

    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return _masked_sum(loss_mat, mask) / denom

    seq_tokens = mask.sum(dim=-1)
    seq_losses = _masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (seq_tokens + 1e-8)  # verl's epsilon; empty sequences are dropped below
    seq_mask = (seq_tokens > 0).to(loss_mat.dtype)
    denom = seq_mask.sum() if num_seqs is None else num_seqs
    loss = (seq_losses * seq_mask).sum() / denom
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if norm_len is None else norm_len)
    return loss


POLICY_LOSSES: Registry = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register


def _check_policy_inputs(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor, low: float, high: float
) -> None:
    _check_same_shape(
        log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, response_mask=response_mask
    )
    if low < 0 or high < 0:
        raise ValueError(f"clip ratios must be >= 0, got clip_ratio_low={low}, clip_ratio_high={high}")


def _log_ratio(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    return torch.clamp(log_prob - old_log_prob, min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)


def _metrics(
    clip_frac: Tensor, clip_frac_lower: Tensor, log_ratio: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    # approx_kl is verl's ppo_kl: mean of old - new log-prob (the clamped log ratio) over the response.
    return {
        "clip_frac": clip_frac.detach(),
        "clip_frac_lower": clip_frac_lower.detach(),
        "approx_kl": _masked_mean(-log_ratio, mask).detach(),
    }


@register_policy_loss("vanilla")
def vanilla_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    agg: AggFn,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Unclipped importance-weighted policy gradient: loss = -A * exp(logp - old_logp).

    With ``old_log_prob = log_prob.detach()`` the ratio is 1 and the gradient is -A * grad(logp), i.e.
    REINFORCE. The clip arguments are accepted for the common signature and ignored; the clip fractions are 0.
    """
    _check_policy_inputs(log_prob, old_log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high)
    log_ratio = _log_ratio(log_prob, old_log_prob)
    loss = agg(-advantages * torch.exp(log_ratio), response_mask)
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    return loss, _metrics(zero, zero, log_ratio, response_mask)


@register_policy_loss("ppo_clip")
def ppo_clip_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    agg: AggFn,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate with dual clip (Ye et al. 2019), verl's "vanilla" policy loss.

    loss = max(-A r, -A clip(r, 1 - low, 1 + high)); for A < 0 it is further capped at -A * clip_ratio_c,
    so a huge ratio on a bad action cannot produce an unbounded loss. ``clip_frac`` is the fraction of
    response tokens where the clipped term won; ``clip_frac_lower`` where the dual clip bound won.
    """
    _check_policy_inputs(log_prob, old_log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"dual-clip bound clip_ratio_c must be > 1.0, got {clip_ratio_c}")
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    ppo_losses = torch.maximum(unclipped, clipped)
    clip_frac = _masked_mean(torch.gt(clipped, unclipped).to(log_prob.dtype), response_mask)

    dual_bound = -advantages * clip_ratio_c
    dual_losses = torch.minimum(dual_bound, ppo_losses)
    negative = (advantages < 0).to(log_prob.dtype)
    clip_frac_lower = _masked_mean(
        torch.gt(ppo_losses, dual_bound).to(log_prob.dtype) * negative, response_mask
    )

    pg_losses = torch.where(advantages < 0, dual_losses, ppo_losses)
    return agg(pg_losses, response_mask), _metrics(clip_frac, clip_frac_lower, log_ratio, response_mask)


@register_policy_loss("cispo")
def cispo_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    agg: AggFn,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv:2506.13585) as verl defines it: loss = -sg(clip(r, 1 - low, 1 + high)) * A * logp.

    The importance weight is clipped and detached, so unlike PPO no token's gradient is dropped: every token
    keeps A * grad(logp), scaled by its bounded weight. Parameters map one to one onto verl's ActorConfig
    (``clip_ratio_low`` / ``clip_ratio_high``, same 0.2 defaults); the paper's setting of effectively no lower
    bound is ``clip_ratio_low >= 1``. ``clip_ratio_c`` is accepted for the common signature and ignored.
    The loss *value* is not a surrogate objective (it scales with logp); only its gradient is meaningful.
    ``clip_frac`` counts tokens whose weight was changed by the clip; ``clip_frac_lower`` is 0 (as verl).
    """
    _check_policy_inputs(log_prob, old_log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high)
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = -clipped_ratio.detach() * advantages * log_prob
    clip_frac = _masked_mean(torch.ne(ratio, clipped_ratio).to(log_prob.dtype), response_mask)
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    return agg(pg_losses, response_mask), _metrics(clip_frac, zero, log_ratio, response_mask)


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens (Schulman's k1 / k3).

    ``k1`` = logp - ref_logp (verl's "kl"/"k1"). ``k3`` = exp(ref - logp) - (ref - logp) - 1 (verl's
    "low_var_kl"/"k3"): non-negative and lower variance; as verl, ref - logp is clamped to [-20, 20] before
    exp() and the result to [-10, 10], which also stops its gradient on extreme tokens.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL penalty kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    if not isinstance(log_prob, Tensor) or not isinstance(ref_log_prob, Tensor):
        raise ValueError("log_prob and ref_log_prob must be tensors")
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(
            f"ref_log_prob must have the shape of log_prob {tuple(log_prob.shape)}, got {tuple(ref_log_prob.shape)}"
        )
    if kind == "k1":
        return log_prob - ref_log_prob
    log_ratio = torch.clamp(ref_log_prob - log_prob, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, min=-10.0, max=10.0)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension: logsumexp(z) - sum(softmax(z) * z).

    Same formula as verl's ``entropy_from_logits``, except that -inf logits (banned tokens) count as
    probability 0 instead of producing 0 * -inf = NaN; the where() is on the logits so gradients stay finite.
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor [..., vocab_size]")
    probs = torch.softmax(logits, dim=-1)
    finite_logits = torch.where(torch.isneginf(logits), torch.zeros_like(logits), logits)
    return torch.logsumexp(logits, dim=-1) - (probs * finite_logits).sum(dim=-1)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    agg: AggFn,
    cliprange_value: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped critic loss, as verl's ``compute_value_loss``: 0.5 * agg(max((v - R)^2, (v_clip - R)^2)).

    ``v_clip`` keeps the new value within ``cliprange_value`` of the value at rollout time. ``clip_frac``
    is the fraction of response tokens where the clipped error was the larger one.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    if cliprange_value < 0:
        raise ValueError(f"cliprange_value must be >= 0, got {cliprange_value}")
    clipped = torch.maximum(torch.minimum(values, old_values + cliprange_value), old_values - cliprange_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * agg(torch.maximum(err_unclipped, err_clipped), response_mask)
    clip_frac = _masked_mean(torch.gt(err_clipped, err_unclipped).to(values.dtype), response_mask)
    return loss, {"clip_frac": clip_frac.detach()}
