"""Best-of-n / rejection-sampling fine-tuning (seed 000's "filtering approach", RAFT, Llama 3's RS):
sample n per prompt from the current policy, keep the top k by reward, SFT on them; repeat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.algorithms.base import Needs
from preftune.algorithms.online import OnlineAlgorithm, RolloutConfig
from preftune.config import ConfigError, doc
from preftune.losses.sft import sft_loss
from preftune.models.logprobs import per_token_logps


@dataclass
class BestOfNConfig(RolloutConfig):
    samples_per_prompt: int = doc(4, "n: completions sampled per prompt.")
    keep_top: int = doc(1, "k: the best k completions of each prompt (by reward) are kept for SFT.")

    def validate(self, path: str) -> None:
        super().validate(path)
        if not 1 <= self.keep_top <= self.samples_per_prompt:
            raise ConfigError(f"{path}.keep_top: must lie in [1, samples_per_prompt], got {self.keep_top}")


class BestOfN(OnlineAlgorithm):
    """Rejection-sampling fine-tuning: SFT on the top-k of n samples per prompt, every rollout."""

    name = "best_of_n"
    Config = BestOfNConfig
    needs = Needs(data_kind="prompts", loss_unit="token", reference_model=True)  # the reference only measures KL

    def rows_per_prompt(self) -> int:
        return self.config.keep_top

    def advantages(self, rows, *, scores, rewards, forward, global_rewards, accelerator):
        n, k = self.config.samples_per_prompt, self.config.keep_top
        grouped = scores.view(-1, n)
        top = grouped.topk(k, dim=1).indices  # ties: the earlier sample
        keep = (top + torch.arange(grouped.shape[0])[:, None] * n).flatten().tolist()
        kept = torch.zeros(len(rows))
        kept[keep] = 1.0
        best, mean = grouped.max(1).values.repeat_interleave(n), grouped.mean(1).repeat_interleave(n)
        return [rows[i] for i in keep], {"reward/best_of_n": best, "reward/gain_over_mean": best - mean}

    def forward(self, batch):
        logps = per_token_logps(self.policy, batch)
        return sft_loss(logps, batch["completion_mask"])
