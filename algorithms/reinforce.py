"""REINFORCE: the exact baseline the ISOPO variants modify.

GRPO's group-relative advantages, every sample used for exactly one gradient step, no ratio to π_old and no
clipping: the update direction is Σ_i A_i ∇ log π(y_i), aggregated by token-mean.
"""

from .config import AlgorithmConfig, register_algorithm


@register_algorithm("reinforce")
def reinforce() -> AlgorithmConfig:
    return AlgorithmConfig(name="reinforce", adv_estimator="grpo", policy_loss="vanilla", epochs=1)
