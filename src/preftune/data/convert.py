"""Conversions between record kinds: rankings -> pairs (reward models, DPO), pairs -> unpaired (KTO)."""

from __future__ import annotations

import logging
from typing import Iterable

from preftune.data.records import PairRecord, RankingRecord, UnpairedRecord

logger = logging.getLogger("preftune.data")

RANKING_PAIR_MODES = ("all", "best_vs_rest")


def ranking_index_pairs(ranking: list, mode: str = "all") -> list[tuple[int, int]]:
    """(better, worse) completion indices implied by tie groups, best group first.

    "all" gives every strictly ordered pair -- the K-choose-2 comparisons InstructGPT trains its
    reward model on (ties give no pair). "best_vs_rest" gives only the top group against every
    strictly worse completion. Example: ``[[2], [0, 3], [1]]``, "all" ->
    ``[(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]``; "best_vs_rest" -> ``[(2, 0), (2, 3), (2, 1)]``.
    """
    if mode not in RANKING_PAIR_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(RANKING_PAIR_MODES)}")
    winners = ranking[:1] if mode == "best_vs_rest" else ranking
    pairs = []
    for a, better_group in enumerate(winners):
        for worse_group in ranking[a + 1:]:
            pairs.extend((i, j) for i in better_group for j in worse_group)
    return pairs


def rankings_to_pairs(records: Iterable[RankingRecord], mode: str = "all") -> list[PairRecord]:
    """Expand each ranking into PairRecords (see ``ranking_index_pairs`` for the modes).

    Pairs whose two completions are equal text are skipped (no signal) and counted in a warning.
    """
    pairs, identical = [], 0
    for rec in records:
        for i, j in ranking_index_pairs(rec.ranking, mode):
            chosen, rejected = rec.completions[i], rec.completions[j]
            if chosen == rejected:
                identical += 1
                continue
            pairs.append(PairRecord(rec.prompt, chosen, rejected, row=rec.row, annotator=rec.annotator, group=rec.group))
    if identical:
        logger.warning("rankings_to_pairs: skipped %d pair(s) of identical completions", identical)
    return pairs


def pairs_to_unpaired(records: Iterable[PairRecord]) -> list[UnpairedRecord]:
    """Each pair -> (chosen, label True), (rejected, label False), in that order (KTO's recipe)."""
    out = []
    for rec in records:
        tags = {"annotator": rec.annotator, "group": rec.group}
        out.append(UnpairedRecord(rec.prompt, rec.chosen, True, row=rec.row, **tags))
        out.append(UnpairedRecord(rec.prompt, rec.rejected, False, row=rec.row, **tags))
    return out
