"""Several rewards as one reward source: ``mean(A | B)``, ``min(A | B)``, ``weighted(0.8*A | 0.2*B)``.

One reward per group of annotators (e.g. their reward models, or gold functions) combined by an
aggregation rule (``preftune.losses.diverse.aggregate_rewards``): ``mean`` is the utilitarian
objective, ``min`` MaxMin-RLHF's egalitarian one (Chakraborty et al. 2024, eq. 6: optimise the
worst-off group), ``weighted`` a weighted sum. Each part is any reward spec ``resolve_reward`` takes
('vader', 'module:function', 'file.py:function', reward-model folders), so RLOO, PPO, REINFORCE,
best-of-n and evaluation accept several rewards through their one ``reward`` setting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from preftune.losses.diverse import aggregate_rewards

_SPEC = re.compile(r"^\s*(mean|min|weighted)\((.*)\)\s*$", re.S)
_WEIGHTED_PART = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*(.+?)\s*$", re.S)


def parse_aggregate(spec: str) -> tuple[str, list[str], list[float] | None] | None:
    """'min(vader | f.py:calm)' -> ('min', ['vader', 'f.py:calm'], None); not an aggregate -> None.
    Raises ValueError for a malformed aggregate (fewer than 2 parts, a weighted part without 'w*')."""
    match = _SPEC.match(spec)
    if not match:
        return None
    rule, body = match.groups()
    parts = [p.strip() for p in body.split("|")]
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"reward {spec!r}: {rule}(...) needs at least two rewards separated by '|', e.g. {rule}(vader | my.py:calm)")
    if rule != "weighted":
        return rule, parts, None
    weights, specs = [], []
    for part in parts:
        m = _WEIGHTED_PART.match(part)
        if not m:
            raise ValueError(f"reward {spec!r}: each part of weighted(...) is 'WEIGHT*REWARD', got {part!r}")
        weights.append(float(m.group(1)))
        specs.append(m.group(2))
    return rule, specs, weights


class AggregateReward:
    """Score rows with each source, then combine per row (``aggregate_rewards``). ``last_parts`` keeps
    the most recent call's per-source scores ([R][N]), for per-group reporting."""

    def __init__(self, sources: Sequence[Callable], rule: str, weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None):
        self.sources, self.rule, self.weights = list(sources), rule, None if weights is None else list(weights)
        self.names = list(names) if names is not None else [repr(s) for s in self.sources]
        self.last_parts: list[list[float]] = []

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        parts = []
        for source in self.sources:
            scores = source(prompts, completions)
            parts.append([float(s) for s in getattr(scores, "scores", scores)])
        self.last_parts = parts
        weights = None if self.weights is None else torch.tensor(self.weights, dtype=torch.float64)
        return aggregate_rewards(torch.tensor(parts, dtype=torch.float64), self.rule, weights).tolist()

    def __repr__(self) -> str:
        return f"AggregateReward({self.rule}, {self.names})"
