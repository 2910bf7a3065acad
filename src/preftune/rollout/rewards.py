"""Turn a reward spec from a config into a reward source (texts in, floats out)."""

from __future__ import annotations

from pathlib import Path


def resolve_reward(spec: str):
    """'vader' -> VADER sentiment; 'module:function' or 'file.py:function' -> that function; anything
    else -> trained reward model(s) (a run directory or model folder; comma-separated = ensemble)."""
    if spec == "vader":
        from preftune.rewards.sentiment import VaderSentiment

        return VaderSentiment()
    head = spec.split(",")[0]
    if ":" in spec and not Path(head).exists():
        from preftune.rewards.base import FunctionReward

        return FunctionReward(spec)
    from preftune.rewards.model import RewardModel

    return RewardModel.load([p.strip() for p in spec.split(",")])
