"""A labelling session: which items are left, what a label must look like, and where it goes.

``preftune label judge=...`` and the sentiment study's gold-reward labelling go through
:class:`LabelSession`; a person labels in the collection web app (``preftune.collect.local`` writes
the same rows to the same file).
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from preftune.data.records import DataError
from preftune.data.validate import Where, check_ranking
from preftune.label.items import Item
from preftune.label.store import LabelStore

MODES = ("rank", "thumbs")


class LabelError(ValueError):
    """A label the session cannot accept (unknown item, malformed ranking, ...); the message is for the user."""


def _text(value: Any) -> str:
    """Plain text of a prompt or completion (a conversation is shown one message per line)."""
    if isinstance(value, str):
        return value
    return "\n".join(f"[{m['role']}] {m['content']}" for m in value)


class LabelSession:
    def __init__(self, items: Sequence[Item], store: LabelStore, *, mode: str = "rank", annotator: str = "",
                 shuffle: bool = True, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.items: dict[str, Item] = {}
        for item in items:  # an exact repeat of an item is labelled once
            self.items.setdefault(item.key, item)
        self.store, self.mode, self.annotator = store, mode, annotator
        self.shuffle, self.seed = shuffle, seed
        # keys labelled, oldest first, for undo: what the files already hold (so undo survives a restart), then this session's
        earlier = sorted(store.labels + store.skips, key=lambda r: str(r.get("labelled_at", "")))
        self.history: list[str] = list(dict.fromkeys(r["item"] for r in earlier if r["item"] in self.items))

    # -- progress ----------------------------------------------------------------------------------
    def pending(self) -> list[Item]:
        done = self.store.done()
        return [item for key, item in self.items.items() if key not in done]

    def progress(self) -> dict:
        done = self.store.done()
        return {"done": sum(k in done for k in self.items), "total": len(self.items)}

    def next_item(self) -> dict | None:
        """The next unlabelled item as the UI shows it (completions in a per-item random order, so
        position never hints at which model or sample a completion came from), or None when all are done."""
        pending = self.pending()
        if not pending:
            return None
        item = pending[0]
        order = list(range(len(item.completions)))
        if self.shuffle:
            random.Random(f"{self.seed}:{item.key}").shuffle(order)
        return {
            "key": item.key,
            "mode": self.mode,
            "prompt": _text(item.prompt),
            "completions": [{"id": i, "text": _text(item.completions[i])} for i in order],
            "can_undo": bool(self.history),
            **self.progress(),
        }

    # -- labels ------------------------------------------------------------------------------------
    def _item(self, key: Any) -> Item:
        if not isinstance(key, str) or key not in self.items:
            raise LabelError(f"unknown item {key!r}")
        if key in self.store.done():
            raise LabelError(f"item {key} is already labelled (undo it first to change the label)")
        return self.items[key]

    def _meta(self, item: Item) -> dict:
        return {"item": item.key, "annotator": self.annotator, "labelled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def rank(self, key: Any, ranking: Any, **extra: Any) -> list[list[int]]:
        """Record ``ranking`` (best first; tie groups as lists, e.g. ``[[2], [0, 1]]``; ``[[0, 1]]``: a tie) for item ``key``."""
        item = self._item(key)
        if self.mode != "rank":
            raise LabelError("this session collects thumbs up/down, not rankings")
        try:
            groups = check_ranking(ranking, len(item.completions), Where("label", None))
        except DataError as err:
            raise LabelError(f"ranking: {err.message}") from None
        row = {"prompt": item.prompt, "completions": item.completions, "ranking": groups, **self._meta(item), **extra}
        self.store.append([row])
        self.history.append(key)
        return groups

    def thumbs(self, key: Any, labels: Any, **extra: Any) -> list[bool]:
        """Record a thumbs up (True) or down (False) for every completion of item ``key``, in order."""
        item = self._item(key)
        if self.mode != "thumbs":
            raise LabelError("this session collects rankings, not thumbs up/down")
        if not isinstance(labels, list) or len(labels) != len(item.completions) or not all(isinstance(v, bool) for v in labels):
            raise LabelError(f"labels: expected {len(item.completions)} true/false values, one per completion, got {labels!r}")
        meta = self._meta(item)
        self.store.append([{"prompt": item.prompt, "completion": c, "label": v, **meta, **extra}
                           for c, v in zip(item.completions, labels)])
        self.history.append(key)
        return labels

    def skip(self, key: Any) -> None:
        item = self._item(key)
        self.store.append([self._meta(item)], skipped=True)
        self.history.append(key)

    def undo(self) -> str | None:
        """Take back the last label or skip of this session; returns its item key (None: nothing to undo)."""
        while self.history:
            key = self.history.pop()
            if self.store.undo(key):
                return key
        return None

    # -- automatic labels --------------------------------------------------------------------------
    def judge(self, reward: Callable[[list, list], Sequence[float]], *, tie_tolerance: float = 0.0,
              threshold: float = 0.0, batch_size: int = 64, progress: bool = True) -> dict:
        """Label every pending item with a reward function (texts in, scores out): rankings by score,
        scores within ``tie_tolerance`` of their neighbour tied; or thumbs up when score > ``threshold``.
        Items whose completions all tie are skipped. Returns counts."""

        pending = self.pending()
        counts = {"labelled": 0, "skipped_all_tied": 0}
        for start in tqdm(range(0, len(pending), batch_size), disable=not progress, desc="judge", unit="batch"):
            batch = pending[start : start + batch_size]
            prompts = [it.prompt for it in batch for _ in it.completions]
            completions = [c for it in batch for c in it.completions]
            scores = [float(s) for s in reward(prompts, completions)]
            if len(scores) != len(completions):
                raise LabelError(f"the judge returned {len(scores)} scores for {len(completions)} completions")
            offset = 0
            for item in batch:
                own = scores[offset : offset + len(item.completions)]
                offset += len(item.completions)
                meta = {"scores": own}
                if self.mode == "thumbs":
                    self.thumbs(item.key, [s > threshold for s in own], **meta)
                    counts["labelled"] += 1
                    continue
                groups = ranking_from_scores(own, tie_tolerance)
                if len(groups) < 2:
                    self.skip(item.key)
                    counts["skipped_all_tied"] += 1
                else:
                    self.rank(item.key, groups, **meta)
                    counts["labelled"] += 1
        return counts


def ranking_from_scores(scores: Sequence[float], tie_tolerance: float = 0.0) -> list[list[int]]:
    """Indices best first; a score within ``tie_tolerance`` of the previous one joins its tie group."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and scores[groups[-1][-1]] - scores[i] <= tie_tolerance:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
