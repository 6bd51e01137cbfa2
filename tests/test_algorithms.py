"""The algorithm registry: names, presets, validation and what each algorithm asks of the trainer."""

import pytest

from algorithms import ALGORITHMS, AlgorithmConfig, UnknownNameError, get_algorithm
from algorithms.isopo import IsopoConfig

REQUIRED = {"reinforce", "ppo", "grpo", "isopo_ni", "isopo_int", "cispo", "dr_grpo"}


def test_required_algorithms_are_registered():
    assert REQUIRED <= set(ALGORITHMS.names())


def test_unknown_algorithm_lists_the_registered_names():
    with pytest.raises(UnknownNameError) as err:
        get_algorithm("trpo")
    message = str(err.value)
    assert "trpo" in message
    for name in REQUIRED:
        assert name in message


def test_reinforce_is_the_unclipped_on_policy_baseline_that_isopo_modifies():
    base = get_algorithm("reinforce")
    assert (base.adv_estimator, base.policy_loss, base.epochs, base.grad_transform) == ("grpo", "vanilla", 1, "none")
    assert not base.needs_old_log_prob and not base.needs_critic and not base.needs_reference
    for name in ("isopo_ni", "isopo_int"):
        variant = get_algorithm(name)
        # Everything but the gradient transform is REINFORCE's.
        assert variant.replace(name="reinforce", grad_transform="none", isopo=base.isopo) == base
    assert get_algorithm("isopo_ni").isopo.variant == "non_interacting"
    assert get_algorithm("isopo_ni").isopo.setting == "paper"
    assert get_algorithm("isopo_int").isopo.variant == "interacting"


def test_what_each_algorithm_needs():
    assert get_algorithm("ppo").needs_critic and get_algorithm("ppo").needs_old_log_prob
    assert get_algorithm("grpo").needs_old_log_prob and not get_algorithm("grpo").needs_critic
    assert not get_algorithm("dr_grpo").norm_adv_by_std
    assert get_algorithm("dr_grpo").loss_agg_mode == "seq-mean-token-sum-norm"
    assert get_algorithm("cispo").policy_loss == "cispo"
    assert get_algorithm("grpo", kl_coef=0.01).needs_reference
    assert get_algorithm("grpo", epochs=2, mini_batches=3).optimizer_steps_per_batch == 6


def test_overrides_and_nested_isopo_dict():
    cfg = get_algorithm("isopo_ni", isopo={"setting": "overlap", "num_samples": 32})
    assert isinstance(cfg.isopo, IsopoConfig) and cfg.isopo.q == -1.0 and cfg.isopo.r == 0.0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(adv_estimator="vtrace"), "valid names: gae, grpo"),
        (dict(policy_loss="trpo"), "valid names: cispo, ppo_clip, vanilla"),
        (dict(loss_agg_mode="mean"), "loss_agg_mode"),
        (dict(kl_kind="k2"), "kl_kind"),
        (dict(epochs=0), "epochs"),
        (dict(mini_batches=-1), "mini_batches"),
        (dict(clip_ratio_low=-0.1), "clip_ratio_low"),
        (dict(gamma=1.5), "gamma"),
        (dict(grad_transform="isopo", policy_loss="ppo_clip"), "policy_loss=vanilla"),
    ],
)
def test_bad_settings_give_one_clear_error(changes, message):
    with pytest.raises((ValueError, KeyError), match=message):
        AlgorithmConfig(**changes)
