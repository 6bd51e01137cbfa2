"""Policy-gradient algorithms as presets of one AlgorithmConfig, built from registered pieces:
advantage estimators (advantages.py), policy losses and aggregation (losses.py), and gradient transforms
(isopo/)."""

from . import cispo, dr_grpo, grpo, isopo_int, isopo_ni, ppo, reinforce  # noqa: F401  (registration)
from .advantages import ADV_ESTIMATORS, register_adv_est
from .config import ALGORITHMS, AlgorithmConfig, register_algorithm
from .losses import POLICY_LOSSES, register_policy_loss
from .registry import Registry, UnknownNameError


def get_algorithm(name: str, **overrides) -> AlgorithmConfig:
    """The registered preset `name`, with any field overridden; unknown names list the registered ones."""
    config = ALGORITHMS.get(name)()
    return config.replace(**overrides) if overrides else config


__all__ = [
    "ADV_ESTIMATORS", "ALGORITHMS", "POLICY_LOSSES", "AlgorithmConfig", "Registry", "UnknownNameError",
    "get_algorithm", "register_adv_est", "register_algorithm", "register_policy_loss",
]
