"""A label stage done by people: the round's samples become a `preftune collect` project in the
stage folder; the pipeline prints how to invite annotators and serve it, then waits, showing
progress, until ``quota`` items have their ``overlap`` answers or ``deadline_minutes`` pass (counted
from the stage's first start, so a resumed pipeline keeps the clock). The answers are exported as
consensus rows (Borda) into ``labels.jsonl``, the file every train stage reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from preftune.collect.export import consensus_rows, write_rows
from preftune.collect.project import create, login_url, open_store, status
from preftune.collect.settings import CollectConfig
from preftune.config import ConfigError, from_dict
from preftune.pipeline.spec import Stage

log = logging.getLogger("preftune.pipeline")


def _project(stage: Stage, folder: Path, samples: Path):
    s = stage.settings
    cfg = from_dict(CollectConfig, {"samples": str(samples), "mode": s.mode, "overlap": s.overlap,
                                    "guidelines": s.guidelines}, f"stages.{stage.name}")
    project = folder / "project"
    info = create(project, cfg)  # items already there are kept, with their answers
    if info["admin_token"]:
        print(f"{stage.id}: {info['total']} items to label in the project {project}\n"
              f"  admin page (keep it secret; shown once): {login_url(cfg, info['admin_token'], '/admin')}\n"
              f"  invite people:  preftune collect invite {project} NAME ...\n"
              f"  serve the page: preftune collect serve {project}", flush=True)
    return project, cfg


def wait_for_labels(store, quota: int, deadline: float | None, poll: float, stage_id: str) -> dict:
    """Poll the store until ``quota`` items are complete or ``deadline`` (a time.time()) passes."""
    shown = None
    while True:
        s = status(store)
        progress = (s["items_complete"], s["answers"])
        if progress != shown:
            print(f"{stage_id}: {s['items_complete']} of {quota} items labelled ({s['answers']} answers)", flush=True)
            shown = progress
        if s["items_complete"] >= quota:
            return s
        if deadline is not None and time.time() >= deadline:
            if not s["answers"]:
                raise ConfigError(f"{stage_id}: the deadline passed with no labels; give labels and run again with --resume "
                                  "(or raise deadline_minutes)")
            log.warning("%s: deadline passed with %d of %d items complete; going on with them", stage_id, s["items_complete"], quota)
            return s
        time.sleep(poll)


def label_by_people(ctx, stage: Stage, folder: Path, samples: Path, started_at: float) -> dict:
    s = stage.settings
    project, cfg = _project(stage, folder, samples)
    store = open_store(project, cfg)
    try:
        quota = min(s.quota or len(store.items()), len(store.items()))
        deadline = started_at + 60 * s.deadline_minutes if s.deadline_minutes else None
        final = wait_for_labels(store, quota, deadline, s.poll_seconds, stage.id)
        rows = consensus_rows(store, "rankings" if s.mode == "rank" else "unpaired", "borda")
    finally:
        store.close()
    write_rows(rows, str(folder / "labels.jsonl"))
    return {"judge": "people", "project": str(project), "items": final["items"], "labelled": final["items_complete"],
            "answers": final["answers"], "annotators": len(final["annotators"]), "rows": len(rows)}
