"""The reward-spec resolver: a reward spec from a config (`reward: vader`, `module:function`, reward-model
folders, `mean(A | B)`) -> a reward source (texts in, floats out)."""

from __future__ import annotations

from pathlib import Path

from preftune.models.loading import PACKAGED_MODELS
from preftune.rewards.aggregate import AggregateReward, parse_aggregate
from preftune.rewards.base import FunctionReward, resolve_function
from preftune.rewards.model import RewardModel
from preftune.rewards.sentiment import VaderSentiment


def _is_function_spec(spec: str) -> bool:
    """'module:function' or 'file.py:function' (not an existing path that happens to hold a colon)."""
    return ":" in spec and not Path(spec.split(",")[0]).exists()


def resolve_reward(spec: str, *, allow_nonfinite: bool = False):
    """'vader' -> VADER sentiment; 'module:function' or 'file.py:function' -> that function; anything
    else -> trained reward model(s) (a run directory or model folder; comma-separated = ensemble);
    'mean(A | B)', 'min(A | B)', 'weighted(0.7*A | 0.3*B)' -> those rewards aggregated per row.
    ``allow_nonfinite``: a function's NaN/inf scores pass through (for the training loop's guard)."""
    aggregate = parse_aggregate(spec)
    if aggregate is not None:
        rule, parts, weights = aggregate
        return AggregateReward([resolve_reward(p, allow_nonfinite=allow_nonfinite) for p in parts], rule, weights, names=parts)
    if spec == "vader":
        return VaderSentiment()
    if _is_function_spec(spec):
        return FunctionReward(spec, allow_nonfinite=allow_nonfinite)

    return RewardModel.load([p.strip() for p in spec.split(",")])


def check_reward_spec(spec: str) -> None:
    """Raise ValueError now for a spec :func:`resolve_reward` would reject later, without loading
    anything heavy: a function spec must import and name a callable; a reward model path must exist."""
    aggregate = parse_aggregate(spec)
    if aggregate is not None:
        for part in aggregate[1]:
            check_reward_spec(part)
        return
    if spec == "vader":
        return
    if _is_function_spec(spec):
        resolve_function(spec)
        return

    for part in (p.strip() for p in spec.split(",")):
        if not Path(part).expanduser().exists() and part.lower() not in PACKAGED_MODELS and part.count("/") != 1:
            raise ValueError(f"reward {part!r}: no such reward model folder or run directory (nor a function "
                             "'module:function', nor 'vader')")
