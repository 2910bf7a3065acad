"""Generate, label and evaluate stages, built from the commands' own functions: the generate
command's sampler (:func:`preftune.rollout.sampling.generate_completions`), ``preftune label``'s
:func:`~preftune.collect.shortcut.label` (any judge) and ``preftune eval``'s :func:`~preftune.eval.run.run_eval`.

Each writes into its own folder: ``samples.jsonl`` (generate: one row per completion, prompt-major,
saved chunk by chunk in ``samples.partial.jsonl`` so a killed stage continues after its last saved
chunk with the same samples), ``labels.jsonl`` (label: appended item by item, so a killed stage
labels only what is left) or ``results.json`` + ``report.html`` (evaluate, the round's own report).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from preftune.collect.shortcut import LabelConfig, label
from preftune.config import ConfigError, from_dict
from preftune.eval.metrics import win_rate
from preftune.eval.run import EvalConfig, run_eval
from preftune.label.store import LabelStore
from preftune.models.loading import load_model
from preftune.pipeline.people import label_by_people
from preftune.pipeline.spec import PEOPLE, Stage, check_reward
from preftune.pipeline.training import read_rows, write_rows
from preftune.rollout.sampling import generate_completions

log = logging.getLogger("preftune.pipeline")


# -------------------------------------------------------------------------------------------------
# generate
# -------------------------------------------------------------------------------------------------


def _saved_chunks(path: Path, sizes: list[int]) -> int:
    """How many chunks (of ``sizes`` rows) ``path`` holds complete; a chunk cut short by a kill is removed."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    rows = []
    for line in lines:
        if not line.endswith("\n"):
            break
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    total = done = 0
    for size in sizes:
        if total + size > len(rows):
            break
        total, done = total + size, done + 1
    if total != len(lines):
        write_rows(rows[:total], path)
    return done


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def run_generate(ctx, stage: Stage, folder: Path) -> dict:
    """``num_samples`` completions per prompt of the round, from the current policy."""
    s = stage.settings
    prompts = ctx.round_prompts(stage.round)
    k = s.num_samples
    chunks = [prompts[i : i + s.batch_size] for i in range(0, len(prompts), s.batch_size)]
    partial = folder / "samples.partial.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    done = _saved_chunks(partial, [len(c) * k for c in chunks])
    policy = ctx.policy(stage.reads["policy"])
    if done < len(chunks):
        if done:
            log.info("%s: %d of %d chunks already sampled; continuing", stage.id, done, len(chunks))
        _sample_chunks(ctx, stage, policy, chunks, done, partial)
    rows = read_rows(partial)
    write_rows(rows, folder / "samples.jsonl")
    return {"policy": policy, "prompts": len(prompts), "samples": len(rows)}


def _sample_chunks(ctx, stage: Stage, policy: str, chunks: list, first: int, partial: Path) -> None:
    s, cfg = stage.settings, ctx.cfg
    model, tokenizer = load_model(policy)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    for c in range(first, len(chunks)):
        repeated = [p for p in chunks[c] for _ in range(s.num_samples)]
        rows = generate_completions(
            model, tokenizer, repeated, max_new_tokens=s.max_new_tokens or cfg.max_new_tokens, temperature=s.temperature,
            top_p=s.top_p, batch_size=len(repeated), seed=cfg.seed + 1000 * stage.round + c, progress=False,
        )
        for i, row in enumerate(rows):
            row["sample"] = i % s.num_samples
        _append(partial, rows)
        log.info("%s: sampled %d of %d chunks", stage.id, c + 1, len(chunks))
    del model


# -------------------------------------------------------------------------------------------------
# label
# -------------------------------------------------------------------------------------------------


def label_config(stage: Stage, samples: str, output: str, seed: int):
    s = stage.settings
    return from_dict(LabelConfig, {"input": samples, "output": output, "mode": s.mode, "judge": s.judge,
                                   "guidelines": s.guidelines, "tie_tolerance": s.tie_tolerance, "threshold": s.threshold,
                                   "shuffle": False, "seed": seed}, f"stages.{stage.name}")


def check_label(stage: Stage) -> None:
    """ConfigError now (before any model loads) for a judge that cannot be resolved."""
    s = stage.settings
    if s.judge == PEOPLE or s.judge.split(":")[0] == "llm":
        if s.guidelines and not Path(s.guidelines).is_file():
            raise ConfigError(f"stages.{stage.name}.guidelines: no such file {s.guidelines}")
        return

    check_reward(s.judge, f"stages.{stage.name}.judge")


def run_label(ctx, stage: Stage, folder: Path, started: dict) -> dict:
    samples = ctx.folder(stage.reads["samples"]) / "samples.jsonl"
    output = folder / "labels.jsonl"
    if stage.settings.judge == PEOPLE:
        return label_by_people(ctx, stage, folder, samples, started["started_at"])

    result = label(label_config(stage, str(samples), str(output), ctx.cfg.seed))
    store = LabelStore(output)
    return {"judge": stage.settings.judge, "items": result["total"], "labelled": len({r["item"] for r in store.labels}),
            "skipped": len(store.skips)}


# -------------------------------------------------------------------------------------------------
# evaluate
# -------------------------------------------------------------------------------------------------


def run_evaluate(ctx, stage: Stage, folder: Path) -> dict:
    """``preftune eval`` of the current policy against the start model; the win rate against the
    previous round from the two rounds' completions (the same prompts, seed and sample index)."""
    s, cfg = stage.settings, ctx.cfg
    name, policy, start = f"round-{stage.round}", ctx.policy(stage.reads["policy"]), ctx.policy(stage.reads["start"])
    prompts = write_rows([{"prompt": p} for p in ctx.splits()[1]], folder / "prompts.jsonl")
    ecfg = from_dict(EvalConfig, {
        "models": [{"name": name, "path": policy, "algorithm": "pipeline"}], "reference": start, "prompts": str(prompts),
        "reward": cfg.gold_reward, "num_samples": s.num_samples, "max_new_tokens": s.max_new_tokens or cfg.max_new_tokens,
        "seed": cfg.seed, "batch_size": s.batch_size, "output_dir": str(folder),
        "title": f"Round {stage.round} ({stage.name}): {name} vs the start model",
    }, f"stages.{stage.name}")
    run_eval(ecfg)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    mine, ref = results["models"][name], results["models"]["reference"]
    rewards = _rewards(folder, name)
    if stage.reads["previous"] is not None:
        before = _rewards(ctx.folder(stage.reads["previous"]), f"round-{stage.round - 1}")
    else:
        before = _rewards(folder, "reference")  # round 1: the previous policy is the start model
    keys = ("reward_mean", "reward_se", "kl", "kl_se", "kl_per_token", "length_mean", "eos_rate", "distinct_2", "n")
    return {"round": stage.round, "policy": policy, **{k: mine.get(k) for k in keys},
            "win_rate_vs_start": mine.get("win_rate"), "win_rate_vs_previous": win_rate(rewards, before),
            "start_reward_mean": ref.get("reward_mean"), "start_reward_se": ref.get("reward_se"),
            "start_length_mean": ref.get("length_mean"), "report": str(folder / "report.html")}


def _rewards(folder: Path, model: str) -> list[float]:
    return [r["reward"] for r in read_rows(folder / "completions.jsonl") if r.get("model") == model]
