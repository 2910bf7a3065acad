"""The one-person project behind ``preftune label``: a collection project (the same store, web app
and export as ``preftune collect``) with overlap 1 and one annotator, kept in step with a labels file
in the formats ``preftune train`` reads.

* ``output``: rank mode -> rankings rows ``{prompt, completions, ranking, item, annotator,
  labelled_at}`` (a tie of all completions is a ranking of one group: no pairs); thumbs mode ->
  unpaired rows ``{prompt, completion, label, item, annotator, labelled_at}`` (KTO);
* ``output.skipped.jsonl``: ``{item, annotator, labelled_at}`` of skipped items.

The database is the record; the files are rewritten from it (atomically) after every label and undo,
before the reply. Labels already in ``output`` for items the project has no label of -- a labels
file from an earlier version, or a judge's (``judge=``) -- are imported, under their own annotator
(skips under this one), so nothing already labelled is asked again or lost. Rows of items outside
the project are kept as they are, and so is the row of a label that has not changed since (with
what else it carries, e.g. a judge's scores).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from preftune.collect.export import annotator_rows, labelled_at, write_jsonl
from preftune.collect.project import create, open_store
from preftune.collect.settings import CollectConfig
from preftune.collect.store import Store
from preftune.data.validate import Where, check_ranking

LOCAL = "local"  # the annotator's name when none is given


def project_for(output: str | Path, project: str = "") -> Path:
    """The project folder: ``project``, or ``OUTPUT.collect`` next to the labels file."""
    return Path(project) if project else Path(str(output) + ".collect")


class LocalLabels:
    """A one-annotator project and its labels files; ``token`` logs the annotator in."""

    def __init__(self, samples: str, output: str | Path, *, project: str = "", mode: str = "rank", split: str = "train",
                 max_items: int | None = None, guidelines: str = "", annotator: str = ""):
        self.output, self.mode = Path(output), mode
        self.skipped = Path(str(output) + ".skipped.jsonl")
        self.project = project_for(output, project)
        cfg = CollectConfig(samples=samples, mode=mode, split=split, max_items=max_items, guidelines=guidelines, overlap=1)
        create(self.project, cfg)
        self.store: Store = open_store(self.project, cfg)
        self.items = self.store.items()
        self.name = annotator or LOCAL
        self.token = self.store.login_token(self.name)
        self._lock = threading.Lock()
        self.imported = self._import()
        self.write()

    # -- the labels files --------------------------------------------------------------------------
    def _ours(self, row: dict) -> bool:
        """Whether a labels-file row is one this project writes (else it is kept as it is)."""
        if row["item"] not in self.items:
            return False
        return "ranking" in row if self.mode == "rank" else "label" in row and "completion" in row

    def _files(self) -> tuple[list[dict], list[dict]]:
        from preftune.label.store import LabelStore  # the reader: a line cut short by a crash is set aside, others are errors

        rows = LabelStore(self.output)
        return rows.labels, rows.skips

    def _import(self) -> int:
        """Labels in the files for items that have no label row in the project yet: into the store."""
        labels, skips = self._files()
        have = self.store.items_with_labels()
        answers: dict[str, tuple[str, str, object]] = {}
        for no, row in enumerate(labels, start=1):
            item = self.items.get(row["item"])
            if item is None or item["id"] in have or not self._ours(row):
                continue
            who = str(row.get("annotator") or self.name)
            if self.mode == "rank":
                ranking = check_ranking(row["ranking"], item["k"], Where(str(self.output), no))
                answers[item["id"]] = (who, "rank", [sorted(g) for g in ranking])
            else:  # thumbs: one row per completion, in order
                _, _, thumbs = answers.get(item["id"], (who, "thumbs", [None] * item["k"]))
                free = [i for i, c in enumerate(item["completions"]) if c == row["completion"] and thumbs[i] is None]
                if free:
                    thumbs[free[0]] = bool(row["label"])
                answers[item["id"]] = (who, "thumbs", thumbs)
        for row in skips:  # a skip is this person's: with others it would leave the item to them
            if row["item"] in self.items and row["item"] not in have and row["item"] not in answers:
                answers[row["item"]] = (self.name, "skip", None)
        done = 0
        for item_id, (who, kind, answer) in answers.items():
            if kind == "thumbs" and None in answer:  # an incomplete thumbs label: asked again
                continue
            annotator_id = self.store.annotator_id(who, create=True)
            self.store.assign(annotator_id, [item_id])
            self.store.submit(annotator_id, item_id, kind, answer)
            done += 1
        return done

    def write(self) -> None:
        """Rewrite ``output`` and ``output.skipped.jsonl`` from the store (after every change)."""
        with self._lock:
            labels, skips = self._files()
            names = self.store.annotators()
            ours = annotator_rows(self.store, "rankings" if self.mode == "rank" else "unpaired")
            skipped = [{"item": r["item_id"], "annotator": names[r["annotator_id"]], "labelled_at": labelled_at(r["created_at"])}
                       for r in self.store.current() if r["kind"] == "skip"]
            kept = {_label_key(r): r for r in labels if self._ours(r)}  # an unchanged label keeps its row: a judge's scores, ...
            rows = [r for r in labels if not self._ours(r)] + [kept.get(_label_key(r), r) for r in ours]
            kept_skips = [r for r in skips if r["item"] not in self.items] + skipped
            if rows or self.output.exists():
                write_jsonl(rows, self.output)
            if kept_skips or self.skipped.exists():
                write_jsonl(kept_skips, self.skipped)

    def progress(self) -> dict:
        """{"done": items answered or skipped, "total": items}."""
        return {"done": len({r["item_id"] for r in self.store.current()} & set(self.items)), "total": len(self.items)}

    def close(self) -> None:
        self.store.close()


def _label_key(row: dict) -> tuple:
    """What a labels-file row says: the same key = the same label, whatever else the row carries."""
    if "ranking" in row:
        groups = tuple(tuple(sorted(g if isinstance(g, list) else [g])) for g in row["ranking"])
        return row["item"], row.get("annotator"), groups
    return row["item"], row.get("annotator"), json.dumps(row["completion"], sort_keys=True), bool(row["label"])
