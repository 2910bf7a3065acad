"""Supervised fine-tuning: next-token loss on the completion only (seed 000, "Supervised Fine-tuning").

    max_θ Σ_(x, y) Σ_k log P_θ(y_k | x, y_<k)

The prompt tokens condition the model but are never scored. The loss is averaged over all
completion tokens of the global batch (not per row, not per micro-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from preftune.algorithms.base import Algorithm, Metrics, Needs
from preftune.config import doc
from preftune.data.collate import pack_completions
from preftune.losses.sft import sft_loss
from preftune.models.logprobs import per_token_logps


@dataclass
class SFTConfig:
    packing: bool = doc(
        False,
        "Concatenate the rows of a micro-batch into one sequence with per-sequence position ids, so no "
        "compute is spent on padding. Attention never crosses row boundaries (checked by a test).",
    )


class SFT(Algorithm):
    """Supervised fine-tuning: next-token loss on completion tokens only."""

    name = "sft"
    Config = SFTConfig
    needs = Needs(data_kind="sft", loss_unit="token")

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.config.packing:
            return pack_completions(examples)
        return super().collate(examples)

    def chance_loss(self) -> float | None:
        """ln |V|: the next-token loss of a uniform prediction over the vocabulary."""
        embeddings = self.policy.get_output_embeddings()
        if embeddings is None:
            return None
        # out_features: a ZeRO-3 partition's weight tensor is empty outside a forward
        return math.log(getattr(embeddings, "out_features", None) or embeddings.weight.shape[0])

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        mask = batch["completion_mask"]
        logps = per_token_logps(self.policy, batch)
        loss_sum, metrics = sft_loss(logps, mask)
        return loss_sum, metrics
