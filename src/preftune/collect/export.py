"""Export a project's labels in the formats ``preftune train`` reads (see ``preftune.data.records``).

* rankings: ``{"prompt", "completions", "ranking"}`` (DPO family via rankings->pairs, reward models);
* pairs: ``{"prompt", "chosen", "rejected"}``;
* unpaired: ``{"prompt", "completion", "label"}`` (KTO).

Per-annotator rows keep an ``annotator`` field and ``labelled_at``; consensus rows carry
``agreement`` (pairwise, among the item's annotators) and ``annotators`` (how many). Extra keys are
ignored by the data loaders. A tie is a label: a ranking whose completions are all tied (a tie of
two, or "both bad", marked ``both_bad``) is a rankings row of one group, which gives no pairs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from preftune.collect.agreement import item_agreement, pair_signs
from preftune.collect.consensus import consensus, majority_pairs, thumbs_majority
from preftune.collect.project import CollectConfig, as_ranking, labels_by_item
from preftune.collect.store import Store
from preftune.config import ConfigError
from preftune.models.cache import write_jsonl


def thumbs_of(row: dict, k: int) -> list[bool] | None:
    """An answer as thumbs: itself in thumbs mode; in rank mode the top group is up; both bad: all
    down; an all-tied ranking says nothing about good or bad (None)."""
    if row["kind"] == "thumbs":
        return [bool(v) for v in row["answer"]]
    if row["kind"] == "both_bad":
        return [False] * k
    if len(row["answer"]) < 2:
        return None
    return [i in row["answer"][0] for i in range(k)]


def _pairs(base: dict, item: dict, winners) -> list[dict]:
    c = item["completions"]
    return [{"prompt": item["prompt"], "chosen": c[i], "rejected": c[j], **base} for i, j in winners if c[i] != c[j]]


def _strict_pairs(ranking) -> list[tuple[int, int]]:
    return [(i, j) if s > 0 else (j, i) for (i, j), s in pair_signs(ranking).items() if s != 0]


def labelled_at(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


def annotator_rows(store: Store, fmt: str) -> list[dict]:
    items, names = store.items(), store.annotators()
    rows = []
    for r in store.current():
        item = items[r["item_id"]]
        ranking = as_ranking(r, item["k"])
        if ranking is None:  # a skip
            continue
        base = {"item": item["id"], "annotator": names[r["annotator_id"]], "labelled_at": labelled_at(r["created_at"]),
                **({"both_bad": True} if r["kind"] == "both_bad" else {}), **({"comment": r["comment"]} if r["comment"] else {})}
        if fmt == "unpaired":
            rows += [{"prompt": item["prompt"], "completion": c, "label": v, **base}
                     for c, v in zip(item["completions"], thumbs_of(r, item["k"]) or [])]
        elif fmt == "rankings":
            rows.append({"prompt": item["prompt"], "completions": item["completions"], "ranking": ranking, **base})
        else:
            rows += _pairs(base, item, _strict_pairs(ranking))
    return rows


def consensus_rows(store: Store, fmt: str, method: str, min_agreement: float = 0.0, min_annotators: int = 1) -> list[dict]:
    items = store.items()
    rows_by_item: dict[str, list] = {}
    for r in store.current():
        rows_by_item.setdefault(r["item_id"], []).append(r)
    rows = []
    for item_id, by_annotator in labels_by_item(store).items():
        item = items[item_id]
        rankings = list(by_annotator.values())
        score = item_agreement(by_annotator)
        if len(rankings) < min_annotators or (score is not None and score < min_agreement):
            continue
        base = {"item": item_id, "agreement": score, "annotators": len(rankings)}
        result = consensus(rankings, item["k"], method)
        if fmt == "unpaired":
            votes = [v for v in (thumbs_of(r, item["k"]) for r in rows_by_item[item_id]) if v is not None]
            for i, c in enumerate(item["completions"] if votes else []):
                label = thumbs_majority([v[i] for v in votes])
                if label is not None:
                    rows.append({"prompt": item["prompt"], "completion": c, "label": label, **base})
        elif fmt == "rankings":
            rows.append({"prompt": item["prompt"], "completions": item["completions"], "ranking": result["ranking"], **base})
        else:
            winners = majority_pairs(rankings, item["k"]) if method == "majority" else _strict_pairs(result["ranking"])
            rows += _pairs(base, item, winners)
    return rows


def write_rows(rows: list[dict], output: str) -> str:
    """``.jsonl`` / ``.parquet`` file, or a ``datasets.save_to_disk`` folder for any other name."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        write_jsonl(rows, out)
    elif out.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), out)
    elif out.suffix:
        raise ConfigError(f"collect.output: write .jsonl, .parquet or a folder (datasets.save_to_disk), not {out.suffix}")
    else:
        Dataset.from_list(rows).save_to_disk(str(out))
    return str(out)


def export(store: Store, cfg: CollectConfig) -> dict:
    mode = store.get_meta()["mode"]
    fmt = cfg.format if cfg.format != "auto" else ("rankings" if mode == "rank" else "unpaired")
    if cfg.rows == "annotators":
        rows = annotator_rows(store, fmt)
    else:
        rows = consensus_rows(store, fmt, cfg.consensus, cfg.min_agreement, cfg.min_annotators)
    if not rows:
        raise ConfigError("collect export: no labels to export yet (or every item was dropped by min_agreement / min_annotators)")
    return {"output": write_rows(rows, cfg.output), "rows": len(rows), "format": fmt}
