"""KTO: Kahneman–Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306; seed 002 "KTO").

Trains on unpaired (x, y, desirable?) rows. With r = log π_θ(y|x) − log π_ref(y|x) and the
reference point z_ref = max(0, KL estimate), eq. 8 gives per row

    desirable:    λ_D · (1 − σ(β(r − z_ref)))
    undesirable:  λ_U · (1 − σ(β(z_ref − r)))

z_ref is estimated from mismatched pairs (prompt x_i with the completion of another row), and is
not back-propagated through (the paper: it "is not backpropagated through"; it only sets the
reference point). It should be the mean over the GLOBAL batch, so a data-parallel caller all-reduces
(sum, count) and passes ``kl_sum_and_count``; distributed code stays out of this file.
"""

from __future__ import annotations

import torch
from torch import Tensor

Metrics = dict[str, Tensor]


def mismatched_indices(batch_size: int) -> Tensor:
    """Row i's prompt is paired with row (i + 1) % B's completion for the KL estimate.

    Returns LongTensor[B]. For B == 1 this is [0]: the "mismatched" pair is the matched one, so the
    estimate degenerates to that row's own log-ratio. It stays finite and well-defined (and is
    detached), but z_ref then tracks the row's reward, so the gradient signal is weak; prefer B ≥ 2
    per device. TRL refuses micro-batch size 1 for KTO for this reason; here it is allowed so that
    batch-size-1 debugging and gradient-accumulation runs do not crash.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (torch.arange(batch_size) + 1) % batch_size


def kto_kl_estimate(
    kl_policy_logps: Tensor,
    kl_reference_logps: Tensor,
    kl_sum_and_count: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """z_ref = max(0, mean_i [log π_θ(y_j|x_i) − log π_ref(y_j|x_i)]) over mismatched pairs, detached.

    Args:
        kl_policy_logps, kl_reference_logps: Tensor[B], summed log-probs of the mismatched completions.
        kl_sum_and_count: optional (Σ over the GLOBAL batch of kl_policy − kl_reference, number of rows),
            e.g. after an all-reduce of this process's ``(diff.sum(), B)``. When given, it replaces the
            local mean, which is what the paper specifies (the batch estimate, not a per-device one).
    Returns: a 0-dim tensor ≥ 0 with no gradient.
    """
    if kl_sum_and_count is None:
        diff = (kl_policy_logps - kl_reference_logps).detach()
        total, count = diff.sum(), diff.numel()
    else:
        total, count = kl_sum_and_count
        total = total.detach()
    # Divide in float32 at least: a bf16 row count is exact only up to 256.
    dtype = torch.promote_types(total.dtype, torch.float32)
    count = torch.as_tensor(count, dtype=dtype, device=total.device).clamp(min=1)
    mean = total.to(dtype) / count
    return mean.clamp(min=0).to(total.dtype)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    kl_policy_logps: Tensor,
    kl_reference_logps: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_sum_and_count: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Metrics]:
    """KTO, Ethayarajh et al. 2024, eq. 8 (λ_y − v(x, y), per row).

    Args:
        policy_logps, reference_logps: Tensor[B], summed log-probs of each row's completion.
        labels: BoolTensor[B], True for desirable rows.
        kl_policy_logps, kl_reference_logps: Tensor[B], summed log-probs of the mismatched pairs
            (see ``mismatched_indices``); only their (detached) mean is used.
        beta: as in DPO (0.1 in the paper).
        desirable_weight, undesirable_weight: λ_D, λ_U (see ``kto_recommended_weights``).
        kl_sum_and_count: global (sum, count) override for the KL estimate (``kto_kl_estimate``).
    Returns:
        losses [B]; metrics (detached, per row, summed by the caller):
        ``rewards`` β·r; ``kl`` z_ref repeated per row; ``chosen_rewards`` / ``rejected_rewards`` β·r on
        desirable / undesirable rows and 0 elsewhere; ``chosen_rows`` / ``rejected_rows`` 1.0/0.0
        indicators. Mean reward of desirable rows = Σ chosen_rewards / Σ chosen_rows (NOT / B).
    """
    labels = labels.bool()
    z_ref = kto_kl_estimate(kl_policy_logps, kl_reference_logps, kl_sum_and_count)
    logratios = policy_logps - reference_logps
    # Both branches are computed for every row; each is finite, so torch.where is NaN-safe in backward.
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z_ref)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - logratios)))
    losses = torch.where(labels, desirable_losses, undesirable_losses)

    rewards = (beta * logratios).detach()
    metrics = {
        "rewards": rewards,
        "kl": z_ref.expand_as(rewards).clone(),
        "chosen_rewards": torch.where(labels, rewards, 0.0),
        "rejected_rewards": torch.where(labels, 0.0, rewards),
        # float32 at least: the caller sums these counts, and bf16 is exact only up to 256.
        "chosen_rows": labels.to(torch.promote_types(rewards.dtype, torch.float32)),
        "rejected_rows": (~labels).to(torch.promote_types(rewards.dtype, torch.float32)),
    }
    return losses, metrics


def kto_recommended_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(λ_D, λ_U) following the KTO paper's rule for imbalanced data: choose the weights so that

        λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]

    (the paper's example: with a 1:10 desirable:undesirable split, λ_U = 1 and λ_D ∈ [10, 13.33]).

    Rule used here: the minority class is up-weighted to parity, the other weight stays 1.
    - n_D/n_U ∈ [1, 4/3] already: (1, 1).
    - n_D < n_U: λ_D = n_U/n_D, λ_U = 1 (ratio 1, the paper's lower bound).
    - n_D/n_U > 4/3: λ_D = 1, λ_U = n_D/n_U (ratio 1).
    Up-weighting the minority (never down-weighting the majority) keeps every weight ≥ 1, so the
    default λ_D = λ_U = 1 is unchanged for balanced data and the majority's loss scale never shrinks.
    If either count is 0 there is nothing to balance: (1, 1).
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"counts must be >= 0, got {n_desirable}, {n_undesirable}")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < 1:
        return n_undesirable / n_desirable, 1.0
    if ratio > 4 / 3:
        return 1.0, ratio
    return 1.0, 1.0
