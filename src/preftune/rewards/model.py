"""Trained reward models (one, or an ensemble) as a reward source.

    rm = RewardModel.load("runs/reward")                      # a run's OUTPUT_DIR, a model folder, or an ensemble
    rm = RewardModel.load(["runs/rm-a", "runs/rm-b"], combine="mean_minus_std", k=1.0)
    out = rm(["What is 2+2?"], ["4"], batch_size=16)
    out.scores, out.mean, out.std, out.members              # combined, ensemble mean/std, per member

Inputs are rendered exactly as in training: the chat template for conversations (and for text when
the model was trained with ``data.text_as_chat``), the same truncation, the reward read at the same
token (see ``preftune.models.reward_head``). A conversational prompt with a text completion (what a
policy generates) gets the completion as one assistant message.

Ensembles: each member is an independent model (see ``algorithms/reward.py``). Bradley–Terry fixes
rewards only up to an additive constant, so a member's constant would count as disagreement;
before combining, each member's score is shifted by its ``offset`` (its mean reward on held-out
data, stored in ``reward_config.json``). ``combine``: ``mean``; ``mean_minus_std`` = mean − k·std
over members (a pessimistic, uncertainty-penalised reward, Coste et al. 2023); ``min`` (worst case).
std is the population std over members. A single model's scores are its raw outputs -- exactly
what ``AutoModelForSequenceClassification`` gives on the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from preftune.data.collate import collate_completions
from preftune.data.records import SFTRecord, is_conversational
from preftune.data.tokenize import tokenize_sft
from preftune.models.loading import ModelLoadError, load_model
from preftune.models.reward_head import extra_special_tokens, finish_reward_ids, pooling_kind, sequence_rewards

log = logging.getLogger("preftune.rewards")
COMBINE_RULES = ("mean", "mean_minus_std", "min")
SPEC_FILE = "reward_config.json"
ENSEMBLE_FILE = "ensemble.json"
Combine = Literal["mean", "mean_minus_std", "min"]


@dataclass
class ScoreSpec:
    """How a reward model reads its inputs; saved next to the model as ``reward_config.json``."""

    max_length: int = 1024
    max_prompt_length: int | None = None
    text_as_chat: bool = False
    offset: float = 0.0
    """Mean reward on held-out (or training) completions; subtracted before combining an ensemble."""

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / SPEC_FILE).write_text(json.dumps({"format": 1, **asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: Path, tokenizer) -> "ScoreSpec":
        path = Path(model_dir) / SPEC_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in ("max_length", "max_prompt_length", "text_as_chat", "offset") if k in data})
        log.warning("%s has no %s (not trained by preftune's reward algorithm): reading the last token, "
                    "text as given; if its score head is untrained, its scores are random", model_dir, SPEC_FILE)
        limit = tokenizer.model_max_length  # a reward model from elsewhere: its own limit, at most 4096
        return cls(max_length=min(int(limit), 4096) if limit and limit < 10**8 else 1024)


@dataclass
class RewardScores(Sequence):
    """Scores of N rows. Iterates over ``scores`` (the combined reward), so it is a reward source's output."""

    scores: list[float]
    mean: list[float]
    std: list[float]
    members: list[list[float]] = field(default_factory=list)
    """members[m][i]: member m's (offset-shifted, for ensembles) score of row i."""

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, i):
        return self.scores[i]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self.scores, dtype=torch.float32)


def combine_scores(member_scores: torch.Tensor, rule: Combine = "mean", k: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """member_scores Tensor[M, N] -> (combined [N], mean [N], population std [N])."""
    if rule not in COMBINE_RULES:
        raise ValueError(f"unknown combine rule {rule!r}; expected one of {', '.join(COMBINE_RULES)}")
    mean = member_scores.mean(0)
    std = member_scores.std(0, unbiased=False)
    if rule == "mean":
        return mean, mean, std
    if rule == "mean_minus_std":
        return mean - k * std, mean, std
    return member_scores.min(0).values, mean, std


@dataclass
class RewardMember:
    """One reward model: a one-label sequence classifier, its tokenizer and how it reads inputs."""

    model: Any
    tokenizer: Any
    spec: ScoreSpec

    def encode(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[dict]:
        """Rows -> ``[{"prompt_ids", "completion_ids"}]`` exactly as training tokenized them."""
        kind = pooling_kind(self.model)
        records = []
        for p, c in zip(prompts, completions, strict=True):
            if is_conversational(p) and isinstance(c, str):
                c = [{"role": "assistant", "content": c}]
            records.append(SFTRecord(p, c))
        max_length, max_prompt = reward_limits(self.spec.max_length, self.spec.max_prompt_length, extra_special_tokens(kind, self.tokenizer))
        examples, _ = tokenize_sft(
            records, self.tokenizer, max_length=max_length, max_prompt_length=max_prompt, truncation="keep_end",
            text_as_chat=self.spec.text_as_chat, add_eos=False, source="<reward inputs>",
        )  # fmt: skip
        out = []
        for ex in examples:
            p, c = finish_reward_ids(ex["prompt_ids"], ex["completion_ids"], self.tokenizer, kind)
            out.append({"prompt_ids": p, "completion_ids": c})
        return out

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], completions: Sequence[Any], *, batch_size: int = 16, dtype: str = "fp32") -> torch.Tensor:
        """Raw rewards, Tensor[N] (fp32, CPU). Rows are length-sorted into batches, then put back in order."""
        examples = self.encode(prompts, completions)
        device = next(self.model.parameters()).device
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt_ids"]) + len(examples[i]["completion_ids"]))
        out = torch.empty(len(examples), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = collate_completions([examples[i] for i in idx], self.tokenizer.pad_token_id)
                with autocast:
                    rewards = sequence_rewards(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                out[idx] = rewards.float().cpu()
        finally:
            self.model.train(was_training)
        return out


def reward_limits(max_length: int, max_prompt_length: int | None, extra: int) -> tuple[int, int | None]:
    """Token limits left for prompt + completion once ``extra`` special tokens are reserved."""
    length = max_length - extra
    if max_prompt_length is not None:
        max_prompt_length = min(max_prompt_length, length - 1)
    return length, max_prompt_length


class RewardModel:
    """A reward source backed by one or more trained reward models (see the module docstring)."""

    def __init__(self, members: list[RewardMember], *, combine: Combine = "mean", k: float = 1.0, batch_size: int = 16, dtype: str = "fp32"):
        if not members:
            raise ValueError("a RewardModel needs at least one member")
        if combine not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {combine!r}; expected one of {', '.join(COMBINE_RULES)}")
        self.members, self.combine, self.k, self.batch_size, self.dtype = members, combine, k, batch_size, dtype

    @classmethod
    def load(
        cls,
        path_or_paths: str | Path | Sequence[str | Path],
        *,
        combine: Combine | None = None,
        k: float | None = None,
        batch_size: int = 16,
        dtype: str = "fp32",
        device: str | torch.device | None = None,
    ) -> "RewardModel":
        """Load reward model(s): a run's OUTPUT_DIR (its ``model/``, or every member of an ensemble run),
        a model folder, any name ``load_model`` accepts, or a list of these (one ensemble).

        ``combine``/``k`` default to what an ensemble run saved (``reward.combine``), else mean / 1.0.
        """
        paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
        folders, saved = [], {}
        for p in paths:
            found, rule = resolve_reward_paths(p)
            folders += found
            saved = saved or rule
        members = []
        for folder in folders:
            _check_one_output(folder)
            model, tokenizer = load_model(str(folder), model_class=AutoModelForSequenceClassification)
            if device is not None:
                model = model.to(device)
            members.append(RewardMember(model.eval(), tokenizer, ScoreSpec.load(Path(folder), tokenizer)))
        combine = combine or saved.get("combine", "mean")
        k = saved.get("k", 1.0) if k is None else k
        return cls(members, combine=combine, k=k, batch_size=batch_size, dtype=dtype)

    def member_scores(self, prompts: Sequence[Any], completions: Sequence[Any], batch_size: int | None = None) -> torch.Tensor:
        """Tensor[M, N]: each member's score (shifted by its offset when M > 1)."""
        bs = batch_size or self.batch_size
        rows = [m.score(prompts, completions, batch_size=bs, dtype=self.dtype) for m in self.members]
        if len(rows) > 1:
            rows = [r - m.spec.offset for r, m in zip(rows, self.members)]
        return torch.stack(rows)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], batch_size: int | None = None) -> RewardScores:
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return RewardScores([], [], [], [[] for _ in self.members])
        member = self.member_scores(prompts, completions, batch_size)
        combined, mean, std = combine_scores(member, self.combine, self.k)
        return RewardScores(combined.tolist(), mean.tolist(), std.tolist(), member.tolist())


def _check_one_output(folder: Path | str) -> None:
    """A local classifier with several outputs (e.g. a reward mixture's shared K-head model) is no reward model."""
    config = Path(folder) / "config.json"
    labels = AutoConfig.from_pretrained(str(folder)).num_labels if config.is_file() else 1
    if labels > 1:
        raise ModelLoadError(f"{folder}: a classifier with {labels} outputs, a reward model has one; a reward mixture's "
                             "shared model (reward.groups=mixture) is scored per component, OUTPUT_DIR/component-k, or "
                             "all components as one ensemble, OUTPUT_DIR; a distributional reward's mean is OUTPUT_DIR/mean")


def resolve_reward_paths(path: str | Path) -> tuple[list[Path | str], dict]:
    """A path given by the user -> the model folders it stands for (+ a saved combine rule, if any)."""
    p = Path(path).expanduser()
    manifest = p / ENSEMBLE_FILE
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        folders = [p / m for m in data["members"]]
        missing = [str(f) for f in folders if not (f / "config.json").is_file() and not (f / "adapter_config.json").is_file()]
        if missing:
            raise ModelLoadError(
                f"ensemble {p}: {len(missing)} of {len(folders)} members are not trained yet ({', '.join(missing)}); "
                "finish the run (preftune train ... --resume)"
            )
        return folders, {"combine": data.get("combine", "mean"), "k": data.get("k", 1.0)}
    if (p / "model").is_dir() and not (p / "config.json").is_file():
        return [p / "model"], {}
    return [p if p.exists() else str(path)], {}
