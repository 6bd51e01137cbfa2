"""Non-interacting ISOPO: REINFORCE whose every nn.Linear gradient Σ_i A_i G_i becomes Σ_i w_i G_i with
w_i = A_i Ñ_i^p Õ_i^q R̃_i^r, computed inside the single backward pass (setting `paper` by default)."""

from .config import AlgorithmConfig, register_algorithm
from .isopo import IsopoConfig


@register_algorithm("isopo_ni")
def isopo_non_interacting() -> AlgorithmConfig:
    return AlgorithmConfig(name="isopo_ni", adv_estimator="grpo", policy_loss="vanilla", grad_transform="isopo",
                           isopo=IsopoConfig(variant="non_interacting", setting="paper"))
