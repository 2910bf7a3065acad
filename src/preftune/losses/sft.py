"""Negative log-likelihood of completion tokens (seed 000, SFT objective)."""

from __future__ import annotations

import torch


def sft_loss(per_token_logps: torch.Tensor, completion_mask: torch.Tensor):
    """Summed token NLL.

    Args:
        per_token_logps: [B, T] log π(token_t | prefix), any value where the mask is False.
        completion_mask: [B, T] bool, True for scored (completion) tokens.
    Returns:
        (loss_sum: scalar, metrics) where loss_sum = -Σ masked log-probs. Divide by the number of
        scored tokens in the global batch to get the mean NLL per token.
    """
    nll_sum = -torch.where(completion_mask, per_token_logps, 0.0).sum()
    return nll_sum, {}
