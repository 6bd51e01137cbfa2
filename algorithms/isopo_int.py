"""Interacting ISOPO: per layer, the advantages are replaced by Ã = λ (K + λI)⁻¹ A with K the micro-batch's
per-layer NTK — a damped natural-gradient step restricted to one layer, in one backward pass."""

from .config import AlgorithmConfig, register_algorithm
from .isopo import IsopoConfig


@register_algorithm("isopo_int")
def isopo_interacting() -> AlgorithmConfig:
    return AlgorithmConfig(name="isopo_int", adv_estimator="grpo", policy_loss="vanilla", grad_transform="isopo",
                           isopo=IsopoConfig(variant="interacting", setting=None, c_lambda=1.0))
