"""A study's jobs, resumable one by one.

Every job (collect pairs, train a run, evaluate a model, the best-of-n curve) has a *key*: a hash of
everything its result depends on, its inputs' keys included. A finished job leaves
``OUTPUT_DIR/jobs/NAME.json`` (key, result, wall seconds); a rerun of the study finds it and skips
the job when the key matches, and redoes it (and so everything downstream, whose keys change) when
it does not. A training job killed midway continues from its newest checkpoint (written every
``save_steps``) when the run folder's key matches, else starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.config import run_config_to_dict
from preftune.run_config import load_run_config
from preftune.train.checkpoint import list_checkpoints
from preftune.train.loop import train

log = logging.getLogger("preftune.experiments")

__all__ = ["Ledger", "fingerprint", "train_run"]


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dict key order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Ledger:
    """Finished jobs of a study folder: ``OUTPUT_DIR/jobs/NAME.json``."""

    def __init__(self, out: Path):
        self.folder = Path(out) / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
        return self.folder / f"{safe}.json"

    def done(self, name: str, key: str) -> dict | None:
        """The record of job ``name`` if it finished with this key, else None."""
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("key") != key:
            log.info("job %s: settings changed since it ran, redoing it", name)
            return None
        return record

    def record(self, name: str, key: str, result: Any, seconds: float, cpu_seconds: float | None = None) -> dict:
        """Store a finished job: its result, wall seconds and the CPU seconds of this process (all
        threads; on a busy machine the wall time says more about the neighbours than the job)."""
        record = {"name": name, "key": key, "seconds": round(seconds, 2), "result": result,
                  "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 2)}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, self._path(name))
        return record

    def run(self, name: str, key: str, job: Callable[[], Any], *, on_skip: Callable[[], None] | None = None,
            on_start: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None) -> dict:
        """The job's record: from an earlier run with the same key, else run ``job()`` (its result must
        be JSON-able) and record it. The hooks tell a progress display which case it is."""
        found = self.done(name, key)
        if found is not None:
            log.info("job %s: done earlier (%.0f s), skipped", name, found.get("seconds", 0.0))
            if on_skip:
                on_skip()
            return found
        if on_start:
            on_start()
        start, cpu = time.perf_counter(), time.process_time()
        result = job()
        record = self.record(name, key, result, time.perf_counter() - start, time.process_time() - cpu)
        if on_end:
            on_end()
        return record


def train_run(overrides: list[str], run_dir: Path, key: str) -> dict:
    """Train the run ``overrides`` describe, continuing from its newest checkpoint when ``run_dir``
    holds checkpoints of a run with the same ``key`` (a killed job), else from the start. Returns
    ``{"model_dir", "config"}``."""

    marker = run_dir / "study_job.json"
    resume = False
    if list_checkpoints(run_dir) and marker.is_file():
        try:
            resume = json.loads(marker.read_text(encoding="utf-8")).get("key") == key
        except (OSError, json.JSONDecodeError):
            resume = False
    run = load_run_config(None, [*overrides, *(["train.resume_from=latest"] if resume else [])])
    if resume:
        log.info("resuming %s from its newest checkpoint", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key}), encoding="utf-8")
    result = train(run)
    config = run_config_to_dict(run)
    config["train"].pop("resume_from", None)  # the same run whether or not it was resumed
    return {"model_dir": str(result.model_dir), "config": config}
