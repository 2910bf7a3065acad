"""Preference pairs for reward models: optional per-pair margins (``reward.margin_column``) and a
choice of dropping or refusing pairs whose chosen equals their rejected."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

from preftune.data.loaders import read_rows
from preftune.data.records import DataError, PairRecord, type_name
from preftune.data.validate import CONVERTERS, Where

log = logging.getLogger("preftune.data")


@dataclass(frozen=True)
class MarginPair(PairRecord):
    """A preference pair with a margin m ≥ the chosen reward must win by (``reward.margin_column``)."""

    margin: float = 0.0


def load_reward_pairs(source: str, split: str, *, margin_column: str | None, identical: str) -> list[PairRecord]:
    """Pair rows -> PairRecords (MarginPairs with ``margin_column``); identical pairs dropped
    (``identical='drop'``) or refused (``'error'``)."""
    records, dropped = [], []
    for row_no, row in read_rows(source, split):
        where = Where(str(source), row_no)
        rec = CONVERTERS["pairs"](row, where)
        margin = _margin(row, margin_column, where, str(source)) if margin_column else None
        if rec.chosen == rec.rejected:
            if identical == "error":
                raise where.error(
                    "'chosen' and 'rejected' are identical, so the pair carries no preference "
                    "(reward.identical_pairs=drop skips such pairs)", "rejected",
                )  # fmt: skip
            dropped.append(row_no)
            continue
        records.append(rec if margin is None else MarginPair(**{f.name: getattr(rec, f.name) for f in fields(rec)}, margin=margin))
    if dropped:
        shown = ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else "")
        log.warning("%s: dropped %d pair(s) whose chosen and rejected are identical (rows %s)", source, len(dropped), shown)
    if not records:
        raise DataError(f"no pairs left after dropping {len(dropped)} identical pair(s)", source=str(source))
    return records


def _margin(row: dict, column: str, where, source: str) -> float:
    value = row.get(column)
    if value is None:
        raise where.error("missing field; reward.margin_column names it, expected a number (the pair's margin)", column)
    if isinstance(value, str) and source.lower().endswith((".csv", ".tsv")):
        try:
            value = float(value)  # CSV cells are text
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"expected a number (the pair's margin), got {type_name(value)} {value!r}", column)
    if not math.isfinite(value):
        raise where.error(f"the margin must be finite, got {value}", column)
    return float(value)
