"""Train and SFT stages: the round's labels become the data the algorithm reads, then THE loop.

* DPO family: the label stages' ranking rows as they are (the loader turns rankings into pairs);
* KTO: rankings as best-vs-rest pairs (the loader makes them unpaired), or thumbs rows as they are;
* rejection_sampling (best-of-n SFT): each item's best-ranked completion (thumbs: the ups) -> SFT;
* online RL: the round's prompts, optimising a reward model fitted on the labels first (in
  ``STAGE/reward/``) or a given reward spec.

Every run writes checkpoints (``train.save_steps``, default 10); a stage continued after a kill
resumes from the newest one (``train.resume_from=latest``), so its result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from preftune.algorithms import ALGORITHMS
from preftune.config import ConfigError, RunConfig
from preftune.data.convert import ranking_index_pairs
from preftune.models.cache import write_jsonl
from preftune.pipeline.spec import (
    REJECTION_SAMPLING,
    TRAINED,
    PipelineConfig,
    Stage,
    check_reward,
    merge,
)
from preftune.run_config import load_run_config
from preftune.train.checkpoint import list_checkpoints
from preftune.train.loop import train

log = logging.getLogger("preftune.pipeline")

REFUSED = {"reward": "use reward_model: train with an RL algorithm", "sft": "use rejection_sampling, or the sft stage",
           "mdpo": "image-conditioned pairs are not made by a label stage"}


def _algorithms() -> dict:
    return ALGORITHMS


def is_online(algorithm: str) -> bool:
    cls = _algorithms().get(algorithm)
    return cls is not None and cls.needs.data_kind == "prompts"


def loop_algorithm(stage: Stage) -> str:
    if stage.kind == "sft" or stage.settings.algorithm == REJECTION_SAMPLING:
        return "sft"
    return stage.settings.algorithm


def run_settings(cfg: PipelineConfig, user: dict, *, algorithm: str, policy: str, data: str, output_dir: str,
                 start: str, reward: str | None = None, policy_run: bool = True) -> dict:
    """A training run's settings: defaults, then the pipeline's ``train``, then the stage's own, then what
    the pipeline decides (algorithm, output_dir, model.name, data.path, reference, reward)."""
    d = merge(merge({"train": {"seed": cfg.seed, "save_steps": 10}}, cfg.train), user)
    d = merge(d, {"algorithm": algorithm, "output_dir": output_dir, "model": {"name": policy}, "data": {"path": data}})
    lora = d.get("model", {}).get("lora")
    if policy_run and isinstance(lora, dict) and lora.get("enabled"):
        lora["merge_on_save"] = True  # the next round trains and samples from full weights
    section = d.setdefault(algorithm, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{algorithm}: expected a mapping of the algorithm's settings")
    fields = _algorithms()[algorithm].Config.__dataclass_fields__
    if "reference" in fields and cfg.reference == "start" and section.get("reference") is None:
        section["reference"] = start
    if reward is not None:
        section["reward"] = reward
        section.setdefault("max_new_tokens", cfg.max_new_tokens)
    return d


def load_settings(d: dict, path: Path | None = None) -> RunConfig:
    """Validate run settings ``d`` as `preftune train` does (written to ``path``, the run's record, if given)."""
    text = yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return load_run_config(path)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        return load_run_config(f.name)
    finally:
        Path(f.name).unlink()


def check_train_settings(cfg: PipelineConfig, stage: Stage) -> None:
    """ConfigError (naming the stage and key) for a train or SFT stage whose runs would be refused."""
    where = "sft" if stage.kind == "sft" else (f"per_round.{stage.round}.{stage.name}" if stage.name in _per_round(cfg, stage.round)
                                              else f"stages.{stage.name}")
    s = stage.settings
    if stage.kind == "train":
        if s.algorithm != REJECTION_SAMPLING and s.algorithm not in _algorithms():
            valid = [REJECTION_SAMPLING] + [a for a in _algorithms() if a not in REFUSED]
            raise ConfigError(f"{where}.algorithm: unknown '{s.algorithm}'. Valid: {', '.join(valid)}")
        if s.algorithm in REFUSED:
            raise ConfigError(f"{where}.algorithm: '{s.algorithm}' is not a policy update here; {REFUSED[s.algorithm]}")
    reward = None
    if stage.kind == "train" and is_online(s.algorithm):
        reward = "vader" if s.reward_model == TRAINED else s.reward_model
        check_reward(reward, f"{where}.reward_model")
    try:
        load_settings(run_settings(cfg, s.config, algorithm=loop_algorithm(stage), policy=cfg.model, data="<labels>",
                                   output_dir="<stage>", start=cfg.model, reward=reward))
        if reward is not None and s.reward_model == TRAINED:
            load_settings(run_settings(cfg, s.reward_config, algorithm="reward", policy=cfg.model, data="<labels>",
                                       output_dir="<stage>", start=cfg.model, policy_run=False))
    except ConfigError as err:
        raise ConfigError(f"{where}.config: {err}") from None


def _per_round(cfg: PipelineConfig, r: int) -> dict:
    return cfg.per_round.get(r) or cfg.per_round.get(str(r)) or {}


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_rows(rows: list[dict], path: Path) -> Path:
    write_jsonl(rows, path)
    return path


def gather_labels(ctx, stage: Stage) -> tuple[list[dict], dict[str, int]]:
    """The label rows this stage trains on (its round's and ``history`` earlier rounds'), and rows per stage."""
    rows, used = [], {}
    for sid in stage.reads["labels"]:
        these = read_rows(ctx.folder(sid) / "labels.jsonl")
        used[sid] = len(these)
        rows += these
    return rows, used


def training_rows(rows: list[dict], algorithm: str, where: str) -> list[dict]:
    """Label rows (rankings or thumbs) as the records ``algorithm`` reads."""
    ranked = [r for r in rows if "ranking" in r]
    thumbs = [r for r in rows if "label" in r]
    if algorithm == REJECTION_SAMPLING:
        best = [{"prompt": r["prompt"], "completion": r["completions"][r["ranking"][0][0]]} for r in ranked]
        return best + [{"prompt": r["prompt"], "completion": r["completion"]} for r in thumbs if r["label"]]
    kind = _algorithms()[algorithm].needs.data_kind
    if kind == "unpaired":
        pairs = [{"prompt": r["prompt"], "chosen": r["completions"][i], "rejected": r["completions"][j]}
                 for r in ranked for i, j in ranking_index_pairs(r["ranking"], "best_vs_rest")]
        if pairs and thumbs:
            raise ConfigError(f"{where}: the labels mix rankings and thumbs; KTO reads one kind")
        return pairs or [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in thumbs]
    if thumbs:
        raise ConfigError(f"{where}: {algorithm} trains on rankings, but the label stage collected thumbs (mode: thumbs); "
                          "use kto, or mode: rank")
    return ranked


# -------------------------------------------------------------------------------------------------
# Runs
# -------------------------------------------------------------------------------------------------


def train_run(d: dict, record: Path) -> Path:
    """Run (or continue from its newest checkpoint) the training run of settings ``d``; its model folder."""
    out = Path(d["output_dir"])
    if list_checkpoints(out):
        log.info("%s: continuing from its checkpoint %s", out, list_checkpoints(out)[-1].name)
        d = merge(d, {"train": {"resume_from": "latest"}})
    else:
        d = merge(d, {"train": {"overwrite_output_dir": True}})
    run = load_settings(d, record)
    for member in _algorithms()[run.algorithm].member_runs(run):
        result = train(member)
    return result.model_dir


def run_train(ctx, stage: Stage, folder: Path) -> dict:
    s, cfg = stage.settings, ctx.cfg
    policy, start = ctx.policy(stage.reads["policy"]), ctx.policy(stage.reads["start"])
    labels, used = gather_labels(ctx, stage)
    summary: dict[str, Any] = {"algorithm": s.algorithm, "policy_from": policy, "labels_used": used}
    reward = None
    if is_online(s.algorithm):
        reward = s.reward_model
        if s.reward_model == TRAINED:
            ranked = [r for r in labels if "ranking" in r]
            if not ranked:
                raise ConfigError(f"{stage.id}: reward_model 'train' needs rankings; the label stage made none (mode: rank)")
            data = write_rows(ranked, folder / "reward_data.jsonl")
            d = run_settings(cfg, s.reward_config, algorithm="reward", policy=policy, data=str(data),
                             output_dir=str(folder / "reward"), start=start, policy_run=False)
            train_run(d, folder / "reward.yaml")
            reward = str(folder / "reward")
            summary["reward_model_rows"] = len(read_rows(data))
        rows = [{"prompt": p} for p in ctx.round_prompts(stage.round)]
    else:
        rows = training_rows(labels, s.algorithm, stage.id)
    data = write_rows(rows, folder / "data.jsonl")
    summary["training_rows"] = len(rows)
    d = run_settings(cfg, s.config, algorithm=loop_algorithm(stage), policy=policy, data=str(data),
                     output_dir=str(folder / "run"), start=start, reward=reward)
    summary["model"] = str(train_run(d, folder / "run.yaml"))
    return summary


def run_sft(ctx, stage: Stage, folder: Path) -> dict:
    d = run_settings(ctx.cfg, stage.settings.config, algorithm="sft", policy=ctx.cfg.model, data=stage.settings.data,
                     output_dir=str(folder / "run"), start=ctx.cfg.model)
    return {"algorithm": "sft", "data": stage.settings.data, "model": str(train_run(d, folder / "run.yaml"))}
