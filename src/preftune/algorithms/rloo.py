"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline over k samples per prompt;
or group-normalised advantages (GRPO-style, Shao et al. 2024) as an option of the same estimator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from preftune.algorithms.base import Metrics
from preftune.algorithms.online import TIS_HELP, OnlineAlgorithm, RolloutConfig, masked_row_sum
from preftune.config import ConfigError, doc
from preftune.losses.rl import reinforce_loss
from preftune.models.logprobs import per_token_logps
from preftune.rollout.advantages import group_normalized_advantages, rloo_advantages

REUSE_SAMPLER_HELP = (
    "Old-policy log-probs (for the KL and the ratio metric) and entropies come from the logits the sampler already "
    "computed for each sampled token, instead of a second no-grad policy forward over the rollout (same values to "
    "float rounding; tested). fp32 only: under bf16/fp16 autocast they are always recomputed, since the decode's "
    "rounding differs from a full forward's and would bias the KL. false: always recompute them."
)


@dataclass
class RLOOConfig(RolloutConfig):
    samples_per_prompt: int = doc(4, "k: completions sampled per prompt; each one's baseline is the mean reward of the other k − 1.")
    advantage: Literal["rloo", "group_normalized"] = doc(
        "rloo", "'rloo': r_i − mean of the other samples of the prompt; 'group_normalized': (r_i − mean) / std over the group (GRPO)."
    )
    reuse_sampler_logps: bool = doc(True, REUSE_SAMPLER_HELP)
    tis_cap: Optional[float] = doc(None, TIS_HELP)

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.samples_per_prompt < 2:
            raise ConfigError(f"{path}.samples_per_prompt: RLOO needs at least 2 samples per prompt, got {self.samples_per_prompt}")


def policy_gradient_forward(algo: OnlineAlgorithm, batch: dict) -> tuple[torch.Tensor, Metrics]:
    """Σ over rows of −A·Σ_t log π(y_t) (+ β·Σ_t KL_t when the KL is a loss term): seed 000's
    REINFORCE gradient E[A ∇log π(y|x)], one unit per sequence. With TIS (``tis_cap``) each token's
    term −A·log π(y_t) is weighted by min(π_old/π_sampler, cap)."""
    logps = per_token_logps(algo.policy, batch)
    mask = batch["completion_mask"].clone()
    mask[:, 0] = False
    losses, _ = reinforce_loss(logps, batch["advantage"], mask)
    weights, metrics = algo.tis_weights(batch, mask)
    if weights is not None:
        losses = losses * weights
    per_row = masked_row_sum(losses + algo.kl_loss_term(logps, batch), mask)
    ratio = torch.exp(logps - batch["old_logps"])
    n = torch.tensor(float(mask.sum()), device=logps.device)
    return per_row.sum(), {"policy/ratio": (torch.where(mask, ratio, 0.0).sum().detach(), n), **metrics}


class RLOO(OnlineAlgorithm):
    """RLOO: REINFORCE with the leave-one-out baseline of k samples per prompt (or GRPO's group-normalised advantages)."""

    name = "rloo"
    Config = RLOOConfig

    def reuse_sampler_logps(self) -> bool:
        return self.config.reuse_sampler_logps

    def tis_cap(self) -> Optional[float]:
        return self.config.tis_cap

    def advantages(self, rows, *, scores, rewards, forward, global_rewards, accelerator):
        k = self.config.samples_per_prompt
        if self.config.advantage == "rloo":
            adv = rloo_advantages(rewards, k)
        else:
            adv = group_normalized_advantages(rewards, k)
        for row, a in zip(rows, adv.tolist()):
            row["advantage"] = a
        return rows, {"advantage/mean": adv, "advantage/abs": adv.abs()}

    def forward(self, batch):
        return policy_gradient_forward(self, batch)
