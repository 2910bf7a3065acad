"""A rollout's health: the per-row flags the loop's guard (preftune/train/guard.py) reads.

The metric names are declared here, where a rollout produces them; the guard imports them.
"""

from __future__ import annotations

import logging
import math

import torch

from preftune.rollout.advantages import zero_variance_groups

log = logging.getLogger("preftune.rl")

NONFINITE_METRICS = ("nonfinite/rewards", "nonfinite/advantages")
"""Fractions an online source reports (rows of the rollout whose reward / advantage is NaN or inf)."""
ZERO_VARIANCE_METRIC = "zero_variance_groups"
"""Fraction of a rollout's prompt groups whose rewards are all equal (no learning signal)."""


def rollout_health(raw_scores: torch.Tensor, scores: torch.Tensor, rows: list[dict], group_size: int) -> dict[str, torch.Tensor]:
    """Per-row / per-group flags the loop's guard reads: rewards (as the reward source gave them) and
    advantages that are not finite, and (with several samples per prompt) the groups whose rewards
    after shaping are all equal (their group-relative advantages are 0)."""
    def finite(value) -> bool:
        return all(math.isfinite(v) for v in (value if isinstance(value, list) else [value]))

    bad_adv = [not all(finite(r[k]) for k in ("advantage", "advantages") if k in r) for r in rows]
    out = {NONFINITE_METRICS[0]: (~torch.isfinite(raw_scores)).float(), NONFINITE_METRICS[1]: torch.tensor(bad_adv, dtype=torch.float32)}
    if group_size > 1 and scores.numel() % group_size == 0:
        out[ZERO_VARIANCE_METRIC] = zero_variance_groups(scores, group_size).float()
    return out


def warn_nonfinite_rewards(rows: list[dict], spec: str) -> None:
    for row in rows:
        if not math.isfinite(row["reward_score"]):
            log.error("reward %r returned %s for prompt %r, completion %r (the step will not be applied)",
                      spec, row["reward_score"], row["prompt"], row["completion"])
            return
