"""PPO: advantages from GAE with a learned critic (a value head on its own copy of the network), the clipped
surrogate around π_old, and a clipped value loss for the critic."""

from .config import AlgorithmConfig, register_algorithm


@register_algorithm("ppo")
def ppo() -> AlgorithmConfig:
    return AlgorithmConfig(name="ppo", adv_estimator="gae", gamma=1.0, lam=1.0, policy_loss="ppo_clip",
                           critic_lr=1e-5, cliprange_value=0.5)
