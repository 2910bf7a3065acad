"""``reward.groups=distributional``: the mean-and-variance reward of distributional preference learning
(Siththaranjan et al. 2023), for preferences that depend on a hidden context such as who is asked.

One backbone with two heads: μ(x, y) and σ(x, y) = softplus(second head), trained on
−log Φ((μ_w − μ_l) / √(σ_w² + σ_l²)) (``losses.diverse.mean_variance_preference_loss``). No group or
annotator field is needed. Output: ``OUTPUT_DIR/mean/`` is μ as a one-label reward model (scored like any
reward folder); ``reward_eval.json`` is μ's held-out report plus ``std``: σ over the held-out completions
and, per group when the pairs carry groups, the mean pair σ = √(σ_w² + σ_l²) — large where people disagree.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.algorithms.reward_report import REPORT_FILE
from preftune.losses.diverse import mean_variance_preference_loss
from preftune.losses.metrics import row_metrics
from preftune.losses.reward import centering_penalty
from preftune.models.cache import write_json
from preftune.models.loading import save_model
from preftune.models.reward_head import component_classifier
from preftune.rewards.evaluation import json_ready, reward_stats
from preftune.rewards.model import RewardMember, RewardModel, ScoreSpec

MIN_STD = 1e-4  # σ = softplus(head) + MIN_STD: z stays finite when the head's output runs far negative


def utility_std(raw: Tensor) -> Tensor:
    """σ from the second head's raw output."""
    return F.softplus(raw) + MIN_STD


def distributional_loss(scores: Tensor, centering_coef: float) -> tuple[Tensor, dict]:
    """scores: Tensor[2B, 2] (μ, raw σ; chosen rows, then rejected). Returns (summed loss, metrics)."""
    b = scores.shape[0] // 2
    mean, std = scores[:, 0], utility_std(scores[:, 1])
    losses, m = mean_variance_preference_loss(mean[:b], std[:b], mean[b:], std[b:])
    metrics = row_metrics({"accuracy": m["accuracies"], "margin": m["margins"], "log_likelihood": m["log_likelihood"],
                           "pair_std": m["pair_std"], "rewards/mean": mean, "std/mean": std})
    if centering_coef > 0:
        penalty = centering_penalty(torch.stack([mean[:b], mean[b:]], -1), centering_coef)
        losses = losses + penalty
        metrics.update(row_metrics({"centering": penalty}))
    return losses.sum(), metrics


def save_distributional(policy, tokenizer, spec: ScoreSpec, out_root: Path, pairs: list,
                        report: Callable[[RewardModel], dict], batch_size: int) -> dict:
    """OUTPUT_DIR/mean/{model, reward_eval.json} and OUTPUT_DIR/reward_eval.json (μ's report + ``std``)."""
    mean_model = component_classifier(policy, 0)
    result = report(RewardModel([RewardMember(mean_model, tokenizer, spec)]))
    folder = Path(out_root) / "mean"
    save_model(mean_model, tokenizer, folder / "model")
    ScoreSpec(**{**asdict(spec), "offset": result["rewards"].get("mean", 0.0)}).save(folder / "model")
    write_json(folder / REPORT_FILE, json_ready(result), default=str)
    std_head = RewardModel([RewardMember(component_classifier(policy, 1), tokenizer, spec)])
    prompts = [p.prompt for p in pairs]
    chosen = utility_std(std_head.member_scores(prompts, [p.chosen for p in pairs], batch_size)[0]) if pairs else torch.zeros(0)
    rejected = utility_std(std_head.member_scores(prompts, [p.rejected for p in pairs], batch_size)[0]) if pairs else torch.zeros(0)
    pair_std = (chosen.square() + rejected.square()).sqrt()
    groups = sorted({p.group for p in pairs if getattr(p, "group", None) is not None})
    result["std"] = {"completions": reward_stats(torch.cat([chosen, rejected])), "pairs": reward_stats(pair_std),
                     "groups": {g: float(pair_std[[i for i, p in enumerate(pairs) if p.group == g]].mean()) for g in groups}}
    write_json(Path(out_root) / REPORT_FILE, json_ready(result), default=str)
    return result
