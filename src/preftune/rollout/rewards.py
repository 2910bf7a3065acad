"""The reward-spec resolver lives in preftune/rewards/spec.py; this name is kept for callers not yet moved."""

from preftune.rewards.spec import check_reward_spec, resolve_reward

__all__ = ["check_reward_spec", "resolve_reward"]
