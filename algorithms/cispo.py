"""CISPO: keeps every token's gradient but clips (and stops the gradient of) its importance weight, instead
of dropping clipped tokens as PPO does. Group-relative advantages as GRPO."""

from .config import AlgorithmConfig, register_algorithm


@register_algorithm("cispo")
def cispo() -> AlgorithmConfig:
    return AlgorithmConfig(name="cispo", adv_estimator="grpo", policy_loss="cispo")
