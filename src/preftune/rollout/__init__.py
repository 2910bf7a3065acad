"""Online RL (issue 5): rollouts as a batch source for the one training loop, plus the pure math they
need. Advantages and baselines are in ``advantages.py``, per-token KL estimators and the KL
coefficient controllers in ``kl.py``; the losses that consume them are in ``losses/rl.py``.

The math imports without a model:

    from preftune.rollout.advantages import gae, rloo_advantages, token_level_rewards
    from preftune.rollout.kl import kl_estimate, AdaptiveKLController
"""
