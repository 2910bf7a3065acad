"""Inter-annotator agreement on rankings: pure functions of ``{item: {annotator: ranking}}``.

A ranking is a list of tie groups of completion indices, best first (``[[2], [0, 1]]``: 2 > 0 = 1),
the ``rankings`` record format of ``preftune.data``. Every pair ``i < j`` of an item's completions is
one pairwise judgement with three outcomes: ``+1`` (i better), ``0`` (tie), ``-1`` (j better).

* :func:`pairwise_agreement` -- the share of (annotator pair, completion pair) judgements that agree.
* :func:`fleiss_kappa` -- Fleiss (1971), "Measuring nominal scale agreement among many raters",
  eq. (1)-(9), on those three outcomes; subjects are (item, completion pair). Raters may differ in
  number per subject (P_i uses each subject's own n_i).
* :func:`krippendorff_alpha_ordinal` -- Krippendorff (2011), "Computing Krippendorff's
  alpha-reliability", sec. C/D: units are (item, completion), values are mid-ranks.
* :func:`annotator_vs_others` -- each annotator's pairwise agreement with the Borda consensus of the
  *other* annotators on the same items.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from typing import Mapping, Sequence

Ranking = Sequence[Sequence[int]]
Labels = Mapping[str, Mapping[str, Ranking]]  # item -> annotator -> ranking


def positions(ranking: Ranking) -> dict[int, int]:
    """completion -> index of its tie group (0 = best)."""
    return {c: g for g, group in enumerate(ranking) for c in group}


def pair_signs(ranking: Ranking) -> dict[tuple[int, int], int]:
    """``{(i, j): +1 | 0 | -1}`` for every pair ``i < j``: +1 when i is ranked above j."""
    pos = positions(ranking)
    return {(i, j): (pos[j] > pos[i]) - (pos[j] < pos[i]) for i, j in combinations(sorted(pos), 2)}


def mid_ranks(ranking: Ranking) -> dict[int, float]:
    """completion -> its rank 1..K, ties sharing the mean of the ranks they span (``[[1], [0, 2]]`` -> 1: 1, 0: 2.5, 2: 2.5)."""
    out, start = {}, 1
    for group in ranking:
        for c in group:
            out[c] = start + (len(group) - 1) / 2
        start += len(group)
    return out


def item_agreement(by_annotator: Mapping[str, Ranking]) -> float | None:
    """Share of agreeing judgements over all annotator pairs and completion pairs; None with < 2 annotators."""
    signs = [pair_signs(r) for r in by_annotator.values()]
    agree = total = 0
    for a, b in combinations(signs, 2):
        for pair, s in a.items():
            total += 1
            agree += s == b[pair]
    return agree / total if total else None


def pairwise_agreement(labels: Labels) -> dict:
    """``{"overall": rate, "per_item": {item: rate}}`` (overall weighs every judgement equally)."""
    per_item, agree, total = {}, 0, 0
    for item, by_annotator in labels.items():
        rate = item_agreement(by_annotator)
        if rate is None:
            continue
        per_item[item] = rate
        n_ann = len(by_annotator)
        k = len(positions(next(iter(by_annotator.values()))))
        n = n_ann * (n_ann - 1) // 2 * (k * (k - 1) // 2)
        agree += rate * n
        total += n
    return {"overall": agree / total if total else None, "per_item": per_item}


def fleiss_kappa(labels: Labels) -> float | None:
    """Fleiss' kappa over subjects (item, completion pair) with outcomes {+1, 0, -1}; None when undefined."""
    p_sum, subjects, category = 0.0, 0, Counter()
    for by_annotator in labels.values():
        if len(by_annotator) < 2:
            continue
        counts: dict = defaultdict(Counter)
        for ranking in by_annotator.values():
            for pair, s in pair_signs(ranking).items():
                counts[pair][s] += 1
        for c in counts.values():
            n = sum(c.values())
            p_sum += (sum(v * v for v in c.values()) - n) / (n * (n - 1))  # eq. (2): P_i
            subjects += 1
            category.update(c)
    if not subjects:
        return None
    total = sum(category.values())
    p_e = sum((v / total) ** 2 for v in category.values())  # eq. (5): P_e = sum_j p_j^2
    p_bar = p_sum / subjects  # eq. (3)
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)  # eq. (6)


def krippendorff_alpha_ordinal(units: Sequence[Sequence[float]]) -> float | None:
    """Krippendorff's alpha, ordinal metric, for ``units``: each the values the coders gave one unit
    (units with < 2 values are not pairable and are left out). None when there is no variation."""
    o: Counter = Counter()  # coincidence matrix o_ck
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for a, b in combinations(range(m), 2):
            o[values[a], values[b]] += 1 / (m - 1)
            o[values[b], values[a]] += 1 / (m - 1)
    n_c: Counter = Counter()
    for (c, _), v in o.items():
        n_c[c] += v
    values = sorted(n_c)
    n = sum(n_c.values())
    if len(values) < 2:
        return None
    index = {v: i for i, v in enumerate(values)}
    cum = [0.0]
    for v in values:
        cum.append(cum[-1] + n_c[v])

    def delta(c, k):  # ordinal metric: (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2
        lo, hi = sorted((index[c], index[k]))
        return (cum[hi + 1] - cum[lo] - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(v * delta(c, k) for (c, k), v in o.items())
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in values for k in values)
    return 1 - (n - 1) * observed / expected


def ranking_alpha(labels: Labels) -> float | None:
    """Krippendorff's ordinal alpha of rankings: units (item, completion), values mid-ranks."""
    units = []
    for by_annotator in labels.values():
        ranks = [mid_ranks(r) for r in by_annotator.values()]
        for c in ranks[0] if ranks else ():
            units.append([r[c] for r in ranks])
    return krippendorff_alpha_ordinal(units)


def annotator_vs_others(labels: Labels) -> dict[str, float | None]:
    """annotator -> share of their pairwise judgements equal to the Borda consensus of the others."""
    from preftune.collect.consensus import borda  # consensus.py imports this module

    agree: Counter = Counter()
    total: Counter = Counter()
    for by_annotator in labels.values():
        for who, ranking in by_annotator.items():
            others = [r for a, r in by_annotator.items() if a != who]
            if not others:
                continue
            consensus = pair_signs(borda(others, len(positions(ranking)))["ranking"])
            for pair, s in pair_signs(ranking).items():
                total[who] += 1
                agree[who] += s == consensus[pair]
    names = {a for by in labels.values() for a in by}
    return {a: (agree[a] / total[a] if total[a] else None) for a in sorted(names)}


def summary(labels: Labels) -> dict:
    """Every agreement figure at once (what ``collect status`` and the admin page show)."""
    pairwise = pairwise_agreement(labels)
    return {
        "pairwise_agreement": pairwise["overall"],
        "fleiss_kappa": fleiss_kappa(labels),
        "krippendorff_alpha_ordinal": ranking_alpha(labels),
        "per_item": pairwise["per_item"],
        "annotator_vs_others": annotator_vs_others(labels),
    }
