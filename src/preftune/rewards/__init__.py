"""Reward sources behind one interface (texts in, floats out): trained reward models, Python functions.

    from preftune.rewards import RewardModel, FunctionReward
    rm = RewardModel.load("runs/reward-tiny")            # OUTPUT_DIR of `preftune train` with algorithm reward
    scores = rm(prompts, completions).scores
    gold = FunctionReward("my_module:my_scorer")         # fn(prompts=..., completions=...) -> list[float]

See ``base.py`` for the ``RewardSource`` protocol, ``model.py`` for loading, ensembles and how inputs
are read, ``evaluation.py`` for accuracy, calibration and gold correlation reports.
"""

from preftune.rewards.base import FunctionReward, RewardSource, resolve_function
from preftune.rewards.evaluation import calibration, pair_report, pearson, reward_stats, score_report, spearman
from preftune.rewards.model import (
                                    COMBINE_RULES,
                                    RewardMember,
                                    RewardModel,
                                    RewardScores,
                                    ScoreSpec,
                                    combine_scores,
                                    resolve_reward_paths,
)

__all__ = [
    "COMBINE_RULES", "FunctionReward", "RewardMember", "RewardModel", "RewardScores", "RewardSource",
    "ScoreSpec", "calibration", "combine_scores", "pair_report", "pearson", "resolve_function",
    "resolve_reward_paths", "reward_stats", "score_report", "spearman",
]
