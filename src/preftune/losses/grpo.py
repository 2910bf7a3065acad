"""Group-relative policy optimisation and its repairs: the clipped surrogate with DAPO's asymmetric
clip, GSPO's sequence-level ratio, the three loss aggregations, and truncated importance sampling
for a sampler whose log-probs differ from the training forward's.

Pure functions of per-token tensors and floats, as in ``losses/rl.py``. Shapes: ``logps``,
``old_logps``, ``sampler_logps`` [B, T] are log-probs of the sampled tokens; ``response_mask``
Bool[B, T] marks the scored completion tokens; advantages are [B] (one per sequence, broadcast) or
[B, T]. Constants of the update (old log-probs, advantages, importance weights) are detached here.

Aggregation (how per-token losses become one number) is where libraries disagree, and where results
start to depend on how a global batch of N sequences with L = Σ_i |o_i| tokens is split:

    sequence  (GRPO, Shao et al. 2024, eq. 3):      1/N · Σ_i 1/|o_i| · Σ_t ℓ_i,t
    token     (DAPO, Yu et al. 2025, eq. 8):        1/L · Σ_i Σ_t ℓ_i,t
    dr_grpo   (Dr. GRPO, Liu et al. 2025, eq. 3):   1/(N · L_max) · Σ_i Σ_t ℓ_i,t      (L_max constant)

``aggregate_rows`` gives each row's share of the numerator and ``aggregation_units`` the row's share
of the denominator; the training loop sums both over the GLOBAL batch (every micro-batch and
process) before dividing, so any micro-batch x accumulation x world-size split gives one update.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Metrics = dict[str, Tensor]
Aggregation = Literal["sequence", "token", "dr_grpo"]
AGGREGATIONS = ("sequence", "token", "dr_grpo")


def _broadcast(advantages: Tensor, like: Tensor) -> Tensor:
    advantages = advantages.detach()
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


def _clip_metrics(mask: Tensor, ratio: Tensor, advantages: Tensor, low: float, high: float) -> Metrics:
    """Per-token indicators of the clipped side that is active (zero gradient there), and the ratio."""
    f = torch.promote_types(ratio.dtype, torch.float32)
    clip_low = mask & (ratio < 1.0 - low) & (advantages < 0)
    clip_high = mask & (ratio > 1.0 + high) & (advantages > 0)
    return {
        "clip_low": clip_low.to(f), "clip_high": clip_high.to(f),
        "ratio": torch.where(mask, ratio, 0.0), "ratio_deviation": torch.where(mask, (ratio - 1.0).abs(), 0.0),
    }


def clipped_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, response_mask: Tensor, *, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, Metrics]:
    """The clipped surrogate of PPO/GRPO with DAPO's decoupled clip range (Yu et al. 2025, arXiv:2503.14476,
    eq. 10, "clip-higher"), per token, negated:

        r_t    = π_θ(y_t) / π_old(y_t)
        loss_t = −min(r_t · A, clip(r_t, 1 − ε_low, 1 + ε_high) · A)

    ε_low = ε_high is GRPO's (DeepSeekMath, arXiv:2402.03300, eq. 3) symmetric clip.

    Returns: losses [B, T] (0 outside the mask); metrics per token: ``clip_low`` (1 where r < 1 − ε_low
    and A < 0: the lower bound holds the gradient at 0), ``clip_high`` (r > 1 + ε_high and A > 0),
    ``ratio``, ``ratio_deviation`` |r − 1| and ``approx_kl`` (k3 of KL(π_old‖π_θ)).
    """
    mask = response_mask.bool()
    adv = _broadcast(advantages, logps)
    log_ratio = torch.where(mask, logps - old_logps.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv)
    losses = torch.where(mask, -surrogate, 0.0)
    with torch.no_grad():
        metrics = _clip_metrics(mask, ratio, adv.expand_as(ratio), epsilon_low, epsilon_high)
        metrics["approx_kl"] = torch.where(mask, torch.expm1(log_ratio) - log_ratio, 0.0)
    return losses, metrics


def gspo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, response_mask: Tensor, *, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, eqs. 5–7): one
    importance ratio per sequence, the length-normalised sequence likelihood ratio, clipped per sequence:

        s_i    = (π_θ(y_i) / π_old(y_i))^(1/|y_i|) = exp(1/|y_i| · Σ_t (log π_θ − log π_old)(y_i,t))
        loss_i = −min(s_i · A_i, clip(s_i, 1 − ε_low, 1 + ε_high) · A_i)

    The per-sequence loss is placed on every token of the sequence, so the ``sequence`` aggregation
    gives the paper's 1/N · Σ_i loss_i (other aggregations weight sequences by length). The gradient
    flows through s_i, i.e. through the mean of the sequence's token log-probs.

    Args: as ``clipped_policy_loss``; advantages [B] (one per sequence). The paper's ranges are small
    (ε_low = 3e-4, ε_high = 4e-4) because s_i is a per-token geometric mean.
    Returns: losses [B, T]; metrics as ``clipped_policy_loss``, per token but of the sequence's s_i.
    """
    mask = response_mask.bool()
    if advantages.dim() != 1:
        raise ValueError(f"gspo_policy_loss takes one advantage per sequence [B], got shape {tuple(advantages.shape)}")
    adv = advantages.detach()
    log_ratio = torch.where(mask, logps - old_logps.detach(), 0.0)
    seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)
    s = torch.exp(seq_log_ratio)
    seq_loss = -torch.minimum(s * adv, torch.clamp(s, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv)
    losses = torch.where(mask, seq_loss.unsqueeze(1), 0.0)
    with torch.no_grad():
        ratio = s.unsqueeze(1).expand_as(logps)
        metrics = _clip_metrics(mask, ratio, adv.unsqueeze(1).expand_as(logps), epsilon_low, epsilon_high)
        seq_kl = (torch.expm1(seq_log_ratio) - seq_log_ratio).unsqueeze(1)
        metrics["approx_kl"] = torch.where(mask, seq_kl, 0.0)
    return losses, metrics


def aggregate_rows(losses: Tensor, response_mask: Tensor, aggregation: Aggregation, *, max_tokens: int) -> Tensor:
    """Each row's share of the aggregated loss's numerator: [B, T] -> [B].

    sequence: Σ_t ℓ_t / |o_i| (token mean of the row); token: Σ_t ℓ_t; dr_grpo: Σ_t ℓ_t / L_max with
    L_max = ``max_tokens`` (the maximum completion length, a constant). Divide the global sum by the
    global sum of ``aggregation_units``.
    """
    mask = response_mask.bool()
    sums = torch.where(mask, losses, 0.0).sum(-1)
    if aggregation == "sequence":
        return sums / mask.sum(-1).clamp(min=1)
    if aggregation == "token":
        return sums
    if aggregation == "dr_grpo":
        if max_tokens < 1:
            raise ValueError(f"dr_grpo aggregation needs max_tokens >= 1, got {max_tokens}")
        return sums / max_tokens
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def aggregation_units(response_mask: Tensor, aggregation: Aggregation) -> int:
    """The denominator's share of a micro-batch: its tokens (``token``) or its rows (the others)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    return int(response_mask.bool().sum()) if aggregation == "token" else int(response_mask.shape[0])


def truncated_importance_weights(
    old_logps: Tensor, sampler_logps: Tensor, response_mask: Tensor, *, cap: float
) -> tuple[Tensor, Metrics]:
    """Truncated importance sampling for a rollout engine whose probabilities differ from the training
    forward's (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training", fengyao.notion.site; the TIS of verl / OpenRLHF):

        w_t = min(π_old(y_t) / π_sampler(y_t), C) = min(exp(old_logp − sampler_logp), C)

    where π_old is the training forward at rollout time and π_sampler the engine that drew y_t (e.g.
    bf16 decode or a quantized copy). Multiplying the policy-gradient term by w_t (detached) corrects
    the expectation to one under π_old, with variance bounded by the cap C.

    Returns: weights [B, T] (0 outside the mask, no grad); metrics per token: ``ratio`` (the untruncated
    π_old/π_sampler), ``truncated`` (1 where the cap binds), ``kl`` (k3 estimate of
    KL(π_sampler‖π_old) from the sampler's own tokens: (ρ − 1) − log ρ with ρ = π_old/π_sampler, ≥ 0).
    """
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    mask = response_mask.bool()
    with torch.no_grad():
        log_rho = torch.where(mask, old_logps.detach().float() - sampler_logps.detach().float(), 0.0)
        rho = torch.exp(log_rho)
        weights = torch.where(mask, rho.clamp(max=cap), 0.0)
        metrics = {
            "ratio": torch.where(mask, rho, 0.0),
            "truncated": (mask & (rho > cap)).float(),
            "kl": torch.where(mask, torch.expm1(log_rho) - log_rho, 0.0),
        }
    return weights, metrics
