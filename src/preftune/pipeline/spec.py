"""A pipeline file: its settings, checked completely before any model loads, and the plan of stages.

    output_dir: runs/iterative-dpo
    model: smollm2-135m-instruct          # the start model
    rounds: 3
    train_prompts: builtin:movie_review_prompts
    stages:                               # run in this order in every round
      generate: {num_samples: 2}
      label: {judge: vader}
      dpo: {kind: train, algorithm: dpo}
      evaluate: {}
    per_round:                            # settings of some rounds: round -> stage -> settings
      3: {dpo: {config: {train: {learning_rate: 1.0e-4}}}}

A stage's kind is its ``kind:`` key, or its name when that names a kind. Every stage reads what the
stages before it made: a label stage the last generate stage before it (in its round), a train stage
the last label stage before it (plus the same stage's labels of earlier rounds with ``history``),
generate / train / evaluate the current policy (the output of the last train stage so far, else the
start model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from preftune.config import (
    ConfigError,
    apply_overrides,
    check_range,
    doc,
    from_dict,
    read_yaml,
    shared,
    to_dict,
)
from preftune.rewards.spec import check_reward_spec

KINDS = ("generate", "label", "train", "evaluate")
PEOPLE = "people"
REJECTION_SAMPLING = "rejection_sampling"
TRAINED = "train"


@dataclass
class GenerateStage:
    """Sample ``num_samples`` completions per prompt of the round from the current policy."""
    kind: str = doc("generate", "The stage kind.")
    num_samples: int = doc(2, "Completions per prompt (K); ranking needs at least 2.")
    temperature: float = doc(1.0, "Sampling temperature.")
    top_p: float = doc(1.0, "Nucleus sampling (1 = off).")
    max_new_tokens: Optional[int] = doc(None, "Tokens per completion. null = the pipeline's max_new_tokens.")
    batch_size: int = doc(16, "Prompts per generate call; the output is saved after every call, so a killed stage resumes there.")

    def validate(self, path: str) -> None:
        if self.num_samples < 1 or self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ConfigError(f"{path}: num_samples, batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"{path}: need temperature >= 0 and 0 < top_p <= 1")


@dataclass
class LabelStage:
    """Label the samples of the last generate stage: a judge, or people through the labelling server."""
    kind: str = doc("label", "The stage kind.")
    judge: str = doc(
        "vader",
        "Who labels: a reward spec ('vader', 'module:function', reward model dir(s), comma-separated = ensemble), "
        "'llm' / 'llm:MODEL' (the LLM judge), or 'people' (a `preftune collect` project in the stage folder; the "
        "pipeline waits, showing progress, until `quota` items are labelled or `deadline_minutes` pass).",
    )
    mode: Literal["rank", "thumbs"] = shared("mode")
    tie_tolerance: float = shared("tie_tolerance")
    threshold: float = shared("threshold")
    guidelines: str = shared("guidelines")
    quota: Optional[int] = doc(None, "people: items that must be labelled before the pipeline goes on. null = all.")
    overlap: int = doc(1, "people: annotators per item.")
    deadline_minutes: Optional[float] = doc(
        None, "people: go on with what is labelled after this many minutes from the stage's start (an error if nothing is). null = wait.")
    poll_seconds: float = doc(10.0, "people: how often the store is read for progress.")

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("quota", "overlap", "deadline_minutes", "poll_seconds"), non_negative=("tie_tolerance",))
        if self.judge.startswith("llm") and self.mode != "rank":
            raise ConfigError(f"{path}.mode: the LLM judge ranks; use mode: rank")


@dataclass
class TrainStage:
    """Train the current policy on the labels: DPO family / KTO, reward model + RL, or rejection sampling."""
    kind: str = doc("train", "The stage kind.")
    algorithm: str = doc(
        "dpo",
        "An offline preference algorithm on the labels (dpo, ipo, cdpo, kto, simpo, orpo, ...); 'rejection_sampling' "
        "(SFT on each prompt's best-ranked completion: best-of-n SFT); or an online RL algorithm (rloo, ppo, grpo, "
        "reinforce, ...) against `reward_model`.",
    )
    history: int = doc(0, "Also train on the labels of this many earlier rounds (the same label stage); -1 = all of them.")
    reward_model: str = doc(
        TRAINED, "Online RL only: 'train' = fit a reward model (algorithm: reward) on the labels first and optimise it; "
        "else a reward spec to optimise directly ('vader', 'module:function', a reward model dir).",
    )
    config: Any = doc(
        factory=dict,
        help="Settings of the training run, as in a `preftune train` file (e.g. {train: {max_steps: 20}, dpo: {beta: 0.1}}), "
        "over the pipeline's `train` settings. The pipeline sets algorithm, output_dir, model.name and data.path.",
    )
    reward_config: Any = doc(factory=dict, help="reward_model 'train': settings of the reward model's run, as `config`.")

    def validate(self, path: str) -> None:
        if self.history < -1:
            raise ConfigError(f"{path}.history: must be >= -1 (-1 = every earlier round), got {self.history}")
        for name in ("config", "reward_config"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{path}.{name}: expected a mapping of run settings, got {type(getattr(self, name)).__name__}")


@dataclass
class EvaluateStage:
    """Gold reward, KL and win rate of the current policy against the start model and the previous round."""
    kind: str = doc("evaluate", "The stage kind.")
    num_samples: int = doc(2, "Completions per held-out prompt and model.")
    max_new_tokens: Optional[int] = doc(None, "Tokens per completion. null = the pipeline's max_new_tokens.")
    batch_size: int = doc(16, "Prompts per generate call and rows per log-prob pass.")

    def validate(self, path: str) -> None:
        if self.num_samples < 1 or self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ConfigError(f"{path}: num_samples, batch_size and max_new_tokens must be >= 1")


STAGE_CLASSES = {"generate": GenerateStage, "label": LabelStage, "train": TrainStage, "evaluate": EvaluateStage}


@dataclass
class SFTStage:
    data: str = doc("", "Demonstrations (prompt, completion) for the SFT stage before round 1. Required.")
    config: Any = doc(factory=dict, help="Settings of the SFT run, as in a `preftune train` file, over the pipeline's `train` settings.")

    def validate(self, path: str) -> None:
        if not self.data:
            raise ConfigError(f"{path}.data: required (a demonstrations file)")
        if not isinstance(self.config, dict):
            raise ConfigError(f"{path}.config: expected a mapping of run settings")


@dataclass
class PipelineConfig:
    output_dir: str = doc("runs/pipeline", "Where OUTPUT_DIR/round-R/STAGE/ folders and report.html go.")
    model: str = doc("smollm2-135m-instruct", "The start model (any name model.name accepts).")
    rounds: int = doc(1, "How many times the stages run; each round starts from the policy the previous one trained.")
    train_prompts: str = doc("", "Prompts to sample from (a prompts file or builtin:NAME). Required.")
    eval_prompts: str = doc("", "Held-out prompts of the evaluate stages. '' = the last `held_out` rows of train_prompts.")
    held_out: int = doc(60, "With eval_prompts '': rows at the end of train_prompts kept out of every round's sampling.")
    prompts_per_round: int = doc(64, "Prompts each round samples: round R takes the next block of the train split (wrapping).")
    eval_rows: int = doc(48, "Held-out prompts each evaluate stage uses (the first rows).")
    max_new_tokens: int = doc(24, "Tokens per completion (generate, evaluate, online RL), unless a stage says otherwise.")
    gold_reward: str = doc("vader", "The gold reward of the evaluate stages (a reward spec).")
    reference: Literal["start", "previous"] = doc(
        "previous", "The KL reference of training in round R: 'start' = the start model (after SFT), 'previous' = the policy "
        "round R starts from. (Evaluation always measures KL to the start model.)",
    )
    seed: int = doc(0, "Seed of sampling and training.")
    train: Any = doc(factory=dict, help="Run settings applied to every training run (e.g. {model: {lora: {enabled: true}}, train: {learning_rate: 5e-4}}).")
    sft: Optional[SFTStage] = doc(None, "An optional SFT stage before round 1 (OUTPUT_DIR/round-0/sft/). null = none.")
    stages: Any = doc(factory=dict, help="The stages of every round, in order: name -> settings (kind: generate | label | train | evaluate).")
    per_round: Any = doc(factory=dict, help="Settings that differ in some rounds: round number -> stage name -> settings.")

    def validate(self, path: str) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if not self.train_prompts:
            raise ConfigError("train_prompts: required (a prompts file or builtin:NAME)")
        check_range("", self, positive=("prompts_per_round", "eval_rows", "max_new_tokens"), non_negative=("held_out",))
        if not isinstance(self.train, dict):
            raise ConfigError(f"train: expected a mapping of run settings, got {type(self.train).__name__}")
        if not isinstance(self.stages, dict) or not self.stages:
            raise ConfigError("stages: expected a mapping of stage name -> settings, with at least one stage")
        if not isinstance(self.per_round, dict):
            raise ConfigError("per_round: expected a mapping of round number -> stage name -> settings")


@dataclass
class Stage:
    """One stage of the plan: where it runs and what it reads (role -> stage id, or None = the start model)."""
    round: int
    name: str
    kind: str
    settings: Any
    reads: dict[str, Any]

    @property
    def id(self) -> str:
        return f"round-{self.round}/{self.name}"


@dataclass
class Pipeline:
    config: PipelineConfig
    stages: list[Stage]
    source: str = ""  # the pipeline file


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _round_settings(cfg: PipelineConfig) -> dict[int, dict]:
    """per_round with integer rounds, each naming only known stages."""
    out: dict[int, dict] = {}
    for key, value in cfg.per_round.items():
        try:
            r = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"per_round.{key}: expected a round number (1..{cfg.rounds})") from None
        if not 1 <= r <= cfg.rounds:
            raise ConfigError(f"per_round.{key}: there is no round {r} (rounds = {cfg.rounds})")
        if not isinstance(value, dict):
            raise ConfigError(f"per_round.{key}: expected a mapping of stage name -> settings")
        for name in value:
            if name not in cfg.stages:
                raise ConfigError(f"per_round.{key}.{name}: unknown stage '{name}'. Stages: {', '.join(cfg.stages)}")
        out[r] = value
    return out


def _round_stage(raw: Any, extra: Any) -> Any:
    """A stage's settings in one round: ``per_round`` merged over them. A round that changes the
    algorithm drops the old algorithm's section of ``config`` (its settings mean nothing to the new one)."""
    if not isinstance(extra, dict) or not (isinstance(raw, dict) or raw is None):
        return raw
    raw = dict(raw or {})
    old = raw.get("algorithm")
    if extra.get("algorithm") not in (None, old) and isinstance(raw.get("config"), dict):
        raw["config"] = {k: v for k, v in raw["config"].items() if k != ("sft" if old == REJECTION_SAMPLING else old)}
    return merge(raw, extra)


def _stage_settings(name: str, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of the stage's settings, got {type(raw).__name__}")
    kind = raw.get("kind", name if name in KINDS else None)
    if kind is None:
        raise ConfigError(f"{path}.kind: required (the stage name '{name}' is not a kind). Valid kinds: {', '.join(KINDS)}")
    if kind not in STAGE_CLASSES:
        raise ConfigError(f"{path}.kind: unknown stage kind '{kind}'. Valid kinds: {', '.join(KINDS)}")
    return from_dict(STAGE_CLASSES[kind], {**raw, "kind": kind}, path)


def build_plan(cfg: PipelineConfig) -> list[Stage]:
    """Every stage of every round in order, with what it reads; ConfigError for a stage whose input
    no earlier stage makes."""
    per_round = _round_settings(cfg)
    plan: list[Stage] = []
    policy: Optional[str] = None  # the stage id of the current policy (None = the start model)
    if cfg.sft is not None:
        plan.append(Stage(0, "sft", "sft", cfg.sft, {"policy": None}))
        policy = "round-0/sft"
    start = policy
    for r in range(1, cfg.rounds + 1):
        latest: dict[str, str] = {}  # kind -> the last stage id of that kind in this round
        for name, raw in cfg.stages.items():
            path = f"per_round.{r}.{name}" if name in per_round.get(r, {}) else f"stages.{name}"
            raw = _round_stage(raw, per_round.get(r, {}).get(name))
            settings = _stage_settings(name, raw, path)
            stage = Stage(r, name, settings.kind, settings, _reads(settings, name, r, latest, policy, start, path, cfg))
            plan.append(stage)
            latest[settings.kind] = stage.id
            if settings.kind == "train":
                policy = stage.id
    return plan


def _reads(settings: Any, name: str, r: int, latest: dict, policy, start, path: str, cfg: PipelineConfig) -> dict:
    kind = settings.kind
    if kind == "generate":
        return {"policy": policy}
    if kind == "label":
        if "generate" not in latest:
            raise ConfigError(f"{path}: a label stage needs samples, but no generate stage comes before '{name}' in the round")
        return {"samples": latest["generate"]}
    if kind == "train":
        from preftune.pipeline.training import is_online  # training.py imports this module

        if "label" not in latest and is_online(settings.algorithm) and settings.reward_model != TRAINED:
            return {"policy": policy, "start": start, "labels": []}  # RL on a given reward: prompts only
        if "label" not in latest:
            raise ConfigError(f"{path}: a train stage needs labels, but no label stage comes before '{name}' in the round")
        label_name = latest["label"].split("/", 1)[1]
        first = 1 if settings.history == -1 else max(1, r - settings.history)
        return {"policy": policy, "start": start, "labels": [f"round-{q}/{label_name}" for q in range(first, r + 1)]}
    previous = f"round-{r - 1}/{name}" if r > 1 else None
    return {"policy": policy, "start": start, "previous": previous}


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read, override and validate a pipeline file, including every training run's settings (no model loads)."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    cfg = from_dict(PipelineConfig, data, "")
    plan = build_plan(cfg)
    from preftune.pipeline.stages import check_label  # stages.py and training.py import this module
    from preftune.pipeline.training import check_train_settings

    check_reward(cfg.gold_reward, "gold_reward")
    for stage in plan:
        if stage.kind in ("train", "sft"):
            check_train_settings(cfg, stage)
        elif stage.kind == "label":
            check_label(stage)
    return Pipeline(cfg, plan, str(path))


def check_reward(spec: str, where: str) -> None:
    try:
        check_reward_spec(spec)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def settings_dict(settings: Any) -> dict:
    return to_dict(settings) if dataclasses.is_dataclass(settings) else dict(settings)


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()
