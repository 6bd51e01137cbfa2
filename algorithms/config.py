"""One dataclass holds every knob of an algorithm; the registered algorithms are presets of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .advantages import ADV_ESTIMATORS
from .isopo.config import IsopoConfig
from .losses import AGG_MODES, KL_KINDS, POLICY_LOSSES
from .registry import Registry

GRAD_TRANSFORMS = ("none", "isopo")


@dataclass
class AlgorithmConfig:
    """A policy-gradient algorithm, assembled from registered pieces."""

    name: str = "reinforce"
    """Registered name this configuration came from (for logs and tables)."""
    adv_estimator: str = "grpo"
    """Advantage estimator: `grpo` (group-relative outcome advantage) or `gae` (needs a critic)."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's reward std (False gives Dr.GRPO's mean-only centring)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 1.0
    """GAE λ."""
    policy_loss: str = "vanilla"
    """Policy loss: `vanilla` (importance-weighted PG, no clipping), `ppo_clip`, or `cispo`."""
    loss_agg_mode: str = "token-mean"
    """How token losses become one number: token-mean, seq-mean-token-sum, seq-mean-token-mean,
    seq-mean-token-sum-norm. Denominators always count the whole mini-batch."""
    clip_ratio_low: float = 0.2
    """Lower clip of the importance ratio (1 − ε_low) for ppo_clip and cispo."""
    clip_ratio_high: float = 0.2
    """Upper clip (1 + ε_high)."""
    clip_ratio_c: float = 3.0
    """Dual-clip bound on negative advantages (ppo_clip)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 2
    """Optimizer steps per rollout batch and epoch; the batch is split into this many mini-batches."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference penalty in the loss; > 0 needs a frozen reference model."""
    kl_kind: str = "k3"
    """KL estimator: `k1` (log-ratio) or `k3` (low-variance)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    critic_lr: float = 1e-5
    """Learning rate of the critic (GAE only)."""
    cliprange_value: float = 0.5
    """Value clipping range of the critic loss."""
    grad_transform: str = "none"
    """`none`, or `isopo`: back-propagate the advantage-free loss and reweight every nn.Linear gradient."""
    isopo: IsopoConfig = field(default_factory=IsopoConfig)
    """ISOPO's knobs (used when grad_transform is `isopo`)."""

    def __post_init__(self) -> None:
        if isinstance(self.isopo, dict):
            self.isopo = IsopoConfig(**self.isopo)
        ADV_ESTIMATORS.get(self.adv_estimator)
        POLICY_LOSSES.get(self.policy_loss)
        _one_of("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        _one_of("kl_kind", self.kl_kind, KL_KINDS)
        _one_of("grad_transform", self.grad_transform, GRAD_TRANSFORMS)
        for name in ("epochs", "mini_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"algorithm {name} must be a positive integer; got {value!r}")
        for name in ("clip_ratio_low", "clip_ratio_high", "kl_coef", "entropy_coef", "cliprange_value"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"algorithm {name} must be >= 0; got {getattr(self, name)}")
        if not self.clip_ratio_c > 1:
            raise ValueError(f"algorithm clip_ratio_c must be > 1; got {self.clip_ratio_c}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"algorithm gamma and lam must lie in [0, 1]; got {self.gamma}, {self.lam}")
        if not self.critic_lr > 0:
            raise ValueError(f"algorithm critic_lr must be > 0; got {self.critic_lr}")
        if self.grad_transform == "isopo":
            if self.policy_loss != "vanilla":
                raise ValueError("ISOPO transforms the plain policy gradient: it needs policy_loss=vanilla")
            if self.adv_estimator != "grpo":
                raise ValueError("ISOPO weights whole sequences: it needs a sequence-level advantage (grpo)")
            if self.kl_coef or self.entropy_coef:
                raise ValueError("ISOPO reweights the policy gradient alone: set kl_coef=0 and entropy_coef=0")

    # What the trainer must prepare, derived rather than stored so it cannot disagree with the knobs.
    @property
    def needs_critic(self) -> bool:
        return self.adv_estimator == "gae"

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def needs_old_log_prob(self) -> bool:
        """π_old matters when a ratio is formed against it: clipped or importance-weighted losses."""
        return self.policy_loss != "vanilla"

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.epochs * self.mini_batches

    def replace(self, **changes) -> AlgorithmConfig:
        return dataclasses.replace(self, **changes)


def _one_of(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"algorithm {name} must be one of {', '.join(allowed)}; got {value!r}")


ALGORITHMS: Registry = Registry("algorithm")
register_algorithm = ALGORITHMS.register
