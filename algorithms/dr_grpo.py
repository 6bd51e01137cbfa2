"""Dr.GRPO: GRPO without the two length and difficulty biases — advantages centred but not divided by the
group std, and token sums divided by a constant length instead of each sequence's own length."""

from .config import AlgorithmConfig, register_algorithm


@register_algorithm("dr_grpo")
def dr_grpo() -> AlgorithmConfig:
    return AlgorithmConfig(name="dr_grpo", adv_estimator="grpo", norm_adv_by_std=False, policy_loss="ppo_clip",
                           loss_agg_mode="seq-mean-token-sum-norm")
