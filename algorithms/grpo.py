"""GRPO: group-relative advantages (reward minus group mean, over group std) and PPO's clipped surrogate
around π_old, the rollout batch split into mini-batches — several optimizer steps per batch."""

from .config import AlgorithmConfig, register_algorithm


@register_algorithm("grpo")
def grpo() -> AlgorithmConfig:
    return AlgorithmConfig(name="grpo", adv_estimator="grpo", policy_loss="ppo_clip", clip_ratio_low=0.2,
                           clip_ratio_high=0.2)
