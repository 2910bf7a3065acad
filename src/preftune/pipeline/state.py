"""Stage records: a stage is done when ``done.json`` holds the hash of its inputs.

Each stage folder gets ``started.json`` (the input hash, when it started) before any work and
``done.json`` (the same hash and a summary) after the last of it; both are written atomically
(a temporary file, fsynced, then renamed), so a kill at any moment leaves either the old record or
the new one. A stage is ``done`` (skip it), ``partial`` (started with the same inputs: continue it
from its own output), ``changed`` (a record with another hash: redo it from scratch) or ``new``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

DONE, STARTED = "done.json", "started.json"


def write_json(path: Path, value: dict) -> None:
    """Write ``value`` to ``path`` atomically (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def status(folder: Path, input_hash: str) -> str:
    """'done' | 'partial' | 'changed' | 'new' for a stage whose inputs hash to ``input_hash``."""
    done, started = read_json(folder / DONE), read_json(folder / STARTED)
    if done is not None and done.get("hash") == input_hash:
        return "done"
    if done is None and started is not None and started.get("hash") == input_hash:
        return "partial"
    if done is not None or started is not None or (folder.exists() and any(folder.iterdir())):
        return "changed"
    return "new"


def mark_started(folder: Path, input_hash: str) -> dict:
    """Record the start (kept when the stage is continued, so e.g. a labelling deadline keeps its clock)."""
    old = read_json(folder / STARTED)
    if old is not None and old.get("hash") == input_hash:
        return old
    record = {"hash": input_hash, "started_at": time.time()}
    write_json(folder / STARTED, record)
    return record


def mark_done(folder: Path, input_hash: str, summary: dict) -> None:
    write_json(folder / DONE, {"hash": input_hash, "finished_at": time.time(), "summary": summary})


def summary(folder: Path) -> dict:
    return (read_json(folder / DONE) or {}).get("summary") or {}
