"""Combining several annotators' rankings of one item into one: pure functions.

Input: the rankings of one item (tie groups of completion indices, best first) and K. Output
``{"ranking": [[...], ...], "scores": [...]}`` -- the consensus ranking (ties where scores are
equal within ``tie_tolerance``) and each completion's score (higher = better).

* :func:`majority` -- majority vote on every pair; a completion's score is its number of pairwise
  majority wins (+0.5 per tied pair): Copeland's method. :func:`majority_pairs` gives the pairs.
* :func:`borda` -- Borda count: per ranking, a completion scores the number of completions below it
  plus half the number tied with it (so ties are symmetric).
* :func:`bradley_terry` -- the maximum-likelihood Bradley-Terry strengths of the pairwise outcomes
  (a tie = half a win each way), fitted by Hunter's (2004) MM iteration, eq. (3), with one virtual
  tie against every other completion as a prior so an undefeated completion has a finite strength.
  Scores are log-strengths.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

from preftune.collect.agreement import pair_signs, positions

Ranking = Sequence[Sequence[int]]
METHODS = ("majority", "borda", "bradley_terry")


def ranking_from_scores(scores: Sequence[float], tie_tolerance: float = 1e-9) -> list[list[int]]:
    """Indices best first; a score within ``tie_tolerance`` of its group's best joins that group."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and scores[groups[-1][0]] - scores[i] <= tie_tolerance:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _wins(rankings: Sequence[Ranking], k: int) -> list[list[float]]:
    """wins[i][j]: how often i beat j (a tie counts 0.5 each way)."""
    wins = [[0.0] * k for _ in range(k)]
    for r in rankings:
        for (i, j), s in pair_signs(r).items():
            wins[i][j] += (s > 0) + 0.5 * (s == 0)
            wins[j][i] += (s < 0) + 0.5 * (s == 0)
    return wins


def majority_pairs(rankings: Sequence[Ranking], k: int) -> list[tuple[int, int]]:
    """(winner, loser) for every pair with a strict majority; tied votes give no pair."""
    wins = _wins(rankings, k)
    return [(i, j) if wins[i][j] > wins[j][i] else (j, i)
            for i, j in combinations(range(k), 2) if wins[i][j] != wins[j][i]]


def majority(rankings: Sequence[Ranking], k: int) -> dict:
    wins = _wins(rankings, k)
    scores = [sum((wins[i][j] > wins[j][i]) + 0.5 * (wins[i][j] == wins[j][i]) for j in range(k) if j != i) for i in range(k)]
    return {"ranking": ranking_from_scores(scores), "scores": scores}


def borda(rankings: Sequence[Ranking], k: int) -> dict:
    scores = [0.0] * k
    for r in rankings:
        pos = positions(r)
        for i in range(k):
            scores[i] += sum((pos[j] > pos[i]) + 0.5 * (pos[j] == pos[i] and j != i) for j in range(k))
    return {"ranking": ranking_from_scores(scores), "scores": scores}


def bradley_terry(rankings: Sequence[Ranking], k: int, *, iterations: int = 200, tol: float = 1e-10) -> dict:
    wins = _wins(rankings, k)
    for i in range(k):  # prior: one virtual tie with every other completion
        for j in range(k):
            if i != j:
                wins[i][j] += 0.5
    p = [1.0] * k
    for _ in range(iterations):
        new = []
        for i in range(k):  # Hunter (2004) eq. (3): p_i = W_i / sum_j n_ij / (p_i + p_j)
            w = sum(wins[i])
            denom = sum((wins[i][j] + wins[j][i]) / (p[i] + p[j]) for j in range(k) if j != i)
            new.append(w / denom)
        g = math.exp(sum(math.log(x) for x in new) / k)  # fix the scale: geometric mean 1
        new = [x / g for x in new]
        done = max(abs(a - b) for a, b in zip(new, p)) < tol
        p = new
        if done:
            break
    scores = [math.log(x) for x in p]
    return {"ranking": ranking_from_scores(scores, 1e-6), "scores": scores}


def consensus(rankings: Sequence[Ranking], k: int, method: str = "borda") -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown consensus method {method!r}; expected one of {', '.join(METHODS)}")
    return {"majority": majority, "borda": borda, "bradley_terry": bradley_terry}[method](rankings, k)


def thumbs_majority(votes: Sequence[bool]) -> bool | None:
    """The majority of thumbs votes for one completion; None on a tie."""
    up = sum(bool(v) for v in votes)
    down = len(votes) - up
    return None if up == down else up > down
