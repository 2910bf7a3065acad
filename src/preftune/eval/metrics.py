"""Pure evaluation statistics: numbers in, numbers out (each checked against a closed form in tests).

* :func:`sequence_kl` -- KL(π‖π_ref) from samples of π, with its standard error.
* :func:`win_rate` -- wins / ties / losses of A against B, ties counting half, with a Wilson interval.
* :func:`distinct_n`, :func:`repeated_ngram_fraction` -- repetition / diversity of texts.
* :func:`best_of_n_kl` -- the closed-form KL of best-of-n sampling.
* :func:`pareto_front` -- the reward-maximising, KL-minimising points of a sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "best_of_n_kl", "distinct_n", "mean_and_se", "mean_repeated_ngram_fraction", "pareto_front",
    "repeated_ngram_fraction", "sequence_kl", "wilson_interval", "win_rate",
]

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def _floats(values) -> list[float]:
    if hasattr(values, "tolist"):  # torch / numpy
        values = values.tolist()
    return [float(v) for v in values]


def mean_and_se(values) -> tuple[float, float]:
    """Sample mean and its standard error (sample std with N − 1, over √N); SE is NaN for N < 2."""
    xs = _floats(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def sequence_kl(policy_logps, reference_logps) -> tuple[float, float]:
    """Monte-Carlo KL(π‖π_ref) from N sequences sampled from π.

    KL(π‖π_ref) = E_{y~π}[log π(y) − log π_ref(y)], and log π(y) = Σ_t log π(y_t | y_<t), so the
    estimate is the mean over samples of the summed per-token log-ratios (unbiased; a single
    sample's value can be negative, the expectation cannot).

    Args:
        policy_logps: [N] log π(y_i | x_i), summed over each sampled completion's tokens.
        reference_logps: [N] log π_ref(y_i | x_i) of the same token ids.

    Returns:
        ``(mean, standard_error)``; the SE is the sample std of the N log-ratios over √N (NaN for N < 2).
    """
    p, q = _floats(policy_logps), _floats(reference_logps)
    if len(p) != len(q):
        raise ValueError(f"{len(p)} policy log-probs but {len(q)} reference log-probs")
    return mean_and_se([a - b for a, b in zip(p, q)])


def wilson_interval(rate: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``rate`` observed over ``n`` trials (Wilson 1927)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1.0 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(rate * (1.0 - rate), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores_a, scores_b, *, tie_tolerance: float = 0.0) -> dict:
    """How often A beats B on paired scores (the same prompt, one completion each).

    A row is a tie when ``|a − b| <= tie_tolerance``. ``rate`` = (wins + ties / 2) / n. The 95%
    interval is Wilson's score interval for that rate over n rows. A tie counts half, so a row's
    outcome takes values {0, ½, 1}, whose variance is at most the Bernoulli p(1 − p) Wilson assumes:
    with ties the interval is slightly conservative (too wide, never too narrow).

    Returns:
        ``{"n", "wins", "ties", "losses", "rate", "ci_low", "ci_high"}`` (rate NaN and [0, 1] for n = 0).
    """
    a, b = _floats(scores_a), _floats(scores_b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores for A but {len(b)} for B: win rates need paired rows")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    wins = sum(x - y > tie_tolerance for x, y in zip(a, b))
    losses = sum(y - x > tie_tolerance for x, y in zip(a, b))
    n = len(a)
    ties = n - wins - losses
    rate = (wins + 0.5 * ties) / n if n else math.nan
    low, high = wilson_interval(rate, n) if n else (0.0, 1.0)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "rate": rate, "ci_low": low, "ci_high": high}


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    tokens = text.split()
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams, pooled over ``texts`` (whitespace
    tokens). 0.0 when there are no n-grams. Low values = repetitive or mode-collapsed outputs."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Fraction of a text's n-grams that repeat an earlier n-gram of the same text: (all − unique) /
    all, whitespace tokens. 0.0 for a text with no n-grams; a loop like "a b a b a b" gives 3/5 at n=2 (5 bigrams, 2 distinct)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = _ngrams(text, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def mean_repeated_ngram_fraction(texts: Sequence[str], n: int) -> float:
    """:func:`repeated_ngram_fraction` averaged over the texts that have at least one n-gram (0.0 if none)."""
    values = [repeated_ngram_fraction(t, n) for t in texts if len(t.split()) >= n]
    return math.fsum(values) / len(values) if values else 0.0


def best_of_n_kl(n: int) -> float:
    """KL(π_bon‖π_ref) = log n − (n − 1)/n of best-of-n sampling (Stiennon et al. 2020, appendix G.3).

    Beirami et al. 2024 ("Theoretical guarantees on the best-of-n alignment policy") show this is an
    upper bound on the true KL, reached when rewards do not tie and each outcome has small
    probability under π_ref (the regime of long free-text completions).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return math.log(n) - (n - 1) / n


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower-or-equal KL and higher-or-equal reward, one
    of them strictly. Maximise reward, minimise KL. Exact duplicates keep only their first index;
    points with a NaN or infinite coordinate are never on the front.

    Args:
        points: ``(kl, reward)`` pairs.

    Returns:
        Indices into ``points``, sorted by increasing KL (the order in which to draw the front).
    """
    pts = [(float(k), float(r)) for k, r in points]
    front = []
    finite = [math.isfinite(k) and math.isfinite(r) for k, r in pts]
    for i, (k, r) in enumerate(pts):
        if not finite[i]:
            continue
        dominated = any(
            (k2 <= k and r2 >= r and (k2 < k or r2 > r)) or ((k2, r2) == (k, r) and j < i)
            for j, (k2, r2) in enumerate(pts)
            if j != i and finite[j]
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1]))
