"""Run a pipeline's stages in order, each once per set of inputs.

A stage's input hash covers its resolved settings (the round's ``per_round`` merged in), the
pipeline settings it uses, the prompts it reads and the hashes of the stages it reads. With
``--resume`` a stage whose ``done.json`` holds that hash is skipped (and says so), one that started
with it continues from its own output (training: its newest checkpoint), and one whose inputs changed
is redone from scratch; so is everything downstream of it, because their hashes include its hash.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import yaml

from preftune.config import ConfigError, to_dict
from preftune.pipeline import stages, state, training
from preftune.pipeline.context import Context
from preftune.pipeline.report import write_pipeline_report
from preftune.pipeline.spec import Pipeline, Stage, digest, settings_dict

log = logging.getLogger("preftune.pipeline")

# The pipeline-level settings each kind of stage depends on (beyond its own settings and inputs).
KIND_GLOBALS = {
    "sft": ("model", "seed", "train"),
    "generate": ("model", "seed", "max_new_tokens"),
    "label": ("seed",),
    "train": ("model", "seed", "train", "reference", "max_new_tokens"),
    "evaluate": ("model", "seed", "max_new_tokens", "gold_reward"),
}


def stage_hash(ctx: Context, stage: Stage, hashes: dict[str, str]) -> str:
    cfg = ctx.cfg
    reads = {role: ([hashes[i] for i in v] if isinstance(v, list) else hashes.get(v) if v else None)
             for role, v in stage.reads.items()}
    data = None
    if stage.kind in ("generate", "train"):
        data = digest(ctx.round_prompts(stage.round))
    elif stage.kind == "evaluate":
        data = digest(ctx.splits()[1])
    elif stage.kind == "sft":
        data = _file_digest(stage.settings.data)
    return digest({"kind": stage.kind, "settings": settings_dict(stage.settings), "reads": reads, "data": data,
                   "globals": {k: getattr(cfg, k) for k in KIND_GLOBALS[stage.kind]}})


def _file_digest(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else path


def _runner(kind: str):
    return {
        "sft": lambda ctx, st, folder, started: training.run_sft(ctx, st, folder),
        "generate": lambda ctx, st, folder, started: stages.run_generate(ctx, st, folder),
        "label": stages.run_label,
        "train": lambda ctx, st, folder, started: training.run_train(ctx, st, folder),
        "evaluate": lambda ctx, st, folder, started: stages.run_evaluate(ctx, st, folder),
    }[kind]


def check_fresh(out: Path, resume: bool) -> None:
    """Without --resume, refuse an output_dir that holds an earlier run's stages (never overwrite silently)."""
    if not resume and any(out.glob(f"round-*/*/{state.STARTED}")):
        raise ConfigError(f"output_dir {out} holds the stages of an earlier run. Continue it with --resume (finished stages "
                          "whose inputs are unchanged are skipped, the others redone), or choose another output_dir")


def run_stage(ctx: Context, stage: Stage, input_hash: str) -> str:
    """Run, continue, redo or skip one stage; returns what happened ('skipped', 'continued', 'redone', 'ran')."""
    folder = ctx.folder(stage.id)
    status = state.status(folder, input_hash)
    if status == "done":
        print(f"{stage.id}: done earlier with the same inputs; skipped", flush=True)
        return "skipped"
    if status == "changed":
        print(f"{stage.id}: its inputs changed since it ran; redoing it from scratch", flush=True)
        shutil.rmtree(folder)
    elif status == "partial":
        print(f"{stage.id}: interrupted earlier; continuing from its own output so far", flush=True)
    else:
        print(f"{stage.id}: running ({stage.kind})", flush=True)
    started = state.mark_started(folder, input_hash)
    t0 = time.perf_counter()
    summary = _runner(stage.kind)(ctx, stage, folder, started)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    state.mark_done(folder, input_hash, summary)
    print(f"{stage.id}: done in {summary['seconds']:.0f} s", flush=True)
    return {"new": "ran", "changed": "redone", "partial": "continued"}[status]


def run_pipeline(pipeline: Pipeline, *, resume: bool = False, progress: bool = True) -> Path:
    """Every stage in order (see the module docstring); returns the pipeline report's path."""
    cfg = pipeline.config
    out = Path(cfg.output_dir)
    check_fresh(out, resume)
    ctx = Context(cfg, out, progress=progress)
    ctx.splits()  # a prompts problem shows before any model loads
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    hashes: dict[str, str] = {}
    t0 = time.perf_counter()
    for stage in pipeline.stages:
        hashes[stage.id] = stage_hash(ctx, stage, hashes)
        run_stage(ctx, stage, hashes[stage.id])
    log.info("pipeline finished in %.0f s", time.perf_counter() - t0)
    return write_pipeline_report(ctx, pipeline)
