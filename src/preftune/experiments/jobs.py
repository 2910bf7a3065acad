"""A study's jobs, resumable one by one.

Every job (collect pairs, train a run, evaluate a model, the best-of-n curve) has a *key*: a hash of
everything its result depends on, its inputs' keys included. A finished job leaves
``OUTPUT_DIR/jobs/NAME.json`` (key, result, wall seconds); a rerun of the study finds it and skips
the job when the key matches, and redoes it (and so everything downstream, whose keys change) when
it does not. A training job killed midway continues from its newest checkpoint (written every
``save_steps``) when the run folder's key matches, else starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.config import run_config_to_dict
from preftune.eval.evaluate import REFERENCE
from preftune.run_config import load_run_config
from preftune.train.checkpoint import checkpoints_dir, list_checkpoints
from preftune.train.loop import train

log = logging.getLogger("preftune.experiments")

__all__ = ["Ledger", "StudyJobs", "fingerprint", "finished", "key_args", "train_resumable", "train_run"]


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


# Overrides that change how a run is kept or shown, not what it learns: left out of job keys, so that
# changing them does not redo finished jobs.
NOT_IN_KEYS = ("train.save_steps=", "train.save_total_limit=", "train.progress_bar=")


def key_args(overrides: list[str]) -> list[str]:
    """``overrides`` without those that cannot change a run's result (``NOT_IN_KEYS``)."""
    return [o for o in overrides if not o.startswith(NOT_IN_KEYS)]


def train_resumable(run: Any, key: str, *, keep_checkpoints: bool = True) -> Any:
    """Train ``run`` (a RunConfig), continuing from its newest checkpoint when its output folder holds
    checkpoints of a run with the same ``key`` (a killed job), else from the start. With
    ``keep_checkpoints=False`` the checkpoints, only needed to continue a killed run, are deleted once
    the final model is saved. Returns the loop's TrainResult."""

    run_dir = Path(run.output_dir)
    marker = run_dir / "study_job.json"
    resume = False
    if list_checkpoints(run_dir) and marker.is_file():
        try:
            resume = json.loads(marker.read_text(encoding="utf-8")).get("key") == key
        except (OSError, json.JSONDecodeError):
            resume = False
    if resume:
        log.info("resuming %s from its newest checkpoint", run_dir)
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, resume_from="latest"))
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key}), encoding="utf-8")
    result = train(run)
    marker.write_text(json.dumps({"key": key, "finished": True}), encoding="utf-8")
    if not keep_checkpoints:
        shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)
    return result


def finished(run_dir: str | Path, key: str) -> bool:
    """Whether :func:`train_resumable` finished a run of this ``key`` in ``run_dir`` (e.g. the first
    group's model of a job killed during the second's)."""
    try:
        marker = json.loads((Path(run_dir) / "study_job.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("key") == key and marker.get("finished") is True


def train_run(overrides: list[str], key: str, *, keep_checkpoints: bool = True) -> dict:
    """Train the run ``overrides`` describe through :func:`train_resumable`. Returns
    ``{"model_dir", "config"}``."""

    run = load_run_config(None, overrides)
    result = train_resumable(run, key, keep_checkpoints=keep_checkpoints)
    return {"model_dir": str(result.model_dir), "config": run_config_to_dict(run)}


class StudyJobs:
    """A study's jobs in the planned order: each run through the ledger (skipped when done earlier with
    the same key) and shown on the study's progress line; their wall and CPU seconds as recorded."""

    def __init__(self, out: Path, progress):
        self.out = out
        self.ledger = Ledger(out)
        self.progress = progress  # a StudyProgress
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float | None] = {}

    def job(self, stage: str, key: str, fn: Callable[[], Any]) -> dict:
        record = self.ledger.run(stage, key, fn, on_skip=lambda: self.progress.skip(stage),
                                 on_start=lambda: self.progress.begin(stage), on_end=self.progress.end)
        self._timed(stage, record)
        return record

    def _timed(self, stage: str, record: dict) -> None:
        self.timings[stage] = record["seconds"]
        self.cpu[stage] = record.get("cpu_seconds")

    def evaluate(self, models: dict, keys: dict, base: str, run: Callable[[dict, Callable[[str, dict], None]], dict], *,
                 reference: str = REFERENCE, settings: str = "evaluate settings") -> tuple[dict, dict]:
        """Evaluate every model of ``models`` (name -> spec) not evaluated earlier, in one pass that
        samples the reference once; each model's metrics are recorded as soon as it is done, so a
        killed evaluation keeps the finished ones.

        ``keys``: name -> the key of the model's weights; ``base``: the key of the evaluation settings
        and of the reference (whose job is ``evaluate {reference}``; each model's ``evaluate {name}``).
        ``run(pending, on_model)`` evaluates the pending models (``preftune.eval.evaluate.evaluate``
        with ``on_model``). Returns (the evaluation's settings, name -> metrics, the reference's
        under ``REFERENCE``)."""

        model_keys = {REFERENCE: base, **{name: fingerprint(base, keys[name]) for name in models}}
        jobs = {REFERENCE: f"evaluate {reference}", **{name: f"evaluate {name}" for name in models}}
        done = {name: self.ledger.done(jobs[name], key) for name, key in model_keys.items()}
        found = self.ledger.done(settings, base)
        pending = {name: spec for name, spec in models.items() if done[name] is None}
        for name in models:
            if done[name] is not None:
                self.progress.skip(jobs[name])
        if not pending and found is not None and done[REFERENCE] is not None:
            self.progress.skip(jobs[REFERENCE])
        else:
            order = [REFERENCE, *pending]
            cpu = [time.process_time()]

            def stored(name: str, metrics: dict) -> None:
                now = time.process_time()
                done[name] = self.ledger.record(jobs[name], model_keys[name], metrics, metrics["seconds"], now - cpu[0])
                cpu[0] = now
                self.progress.end()
                if order.index(name) + 1 < len(order):
                    self.progress.begin(jobs[order[order.index(name) + 1]])

            self.progress.begin(jobs[REFERENCE])
            fresh = run(pending, stored)
            found = self.ledger.record(settings, base, fresh["settings"], 0.0)
        for name, record in done.items():
            self._timed(jobs[name], record)
        return found["result"], {name: record["result"] for name, record in done.items()}
