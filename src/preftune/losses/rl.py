"""Policy-gradient losses for RLHF: REINFORCE and PPO (seed 000 "RLHF: Reinforcement Learning",
"Gradient Derivation", "PPO additional details").

Every loss is a pure function of per-token tensors and floats and returns ``(losses, metrics)``:

- ``losses``: Tensor[B, T], one value per token, 0 outside ``response_mask``. The caller sums them and
  divides by the number of response tokens in the GLOBAL batch (so gradient accumulation and data
  parallelism give the same update as one big batch).
- ``metrics``: dict[str, Tensor[B, T]] of detached per-token values, 0 outside the mask, to be summed
  and divided by the same count.

Shapes: ``logps`` etc. [B, T] are log π(y_t | x, y_<t) of the sampled tokens; ``response_mask``
Bool[B, T] marks the generated tokens. Advantages, old log-probs, old values and returns are
constants of the update: they are detached here, whatever the caller passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

Metrics = dict[str, Tensor]


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    # float32 at least: the caller sums these indicators, and bf16 counts are exact only up to 256.
    return mask.to(torch.promote_types(like.dtype, torch.float32))


def reinforce_loss(logps: Tensor, advantages: Tensor, response_mask: Tensor) -> tuple[Tensor, Metrics]:
    """REINFORCE (Williams 1992; seed 000 "Gradient Derivation"): ∇J = E[A · ∇log π(y|x)] with
    log π(y|x) = Σ_t log π(y_t | x, y_<t), so the per-token loss is

        loss_t = −A · log π(y_t | x, y_<t)

    A is the reward minus a baseline (``MovingAverageBaseline``, ``rloo_advantages``, ...).

    Args:
        logps: [B, T]; advantages: [B] (one per response, broadcast over its tokens) or [B, T];
        response_mask: Bool[B, T].
    Returns: (losses [B, T], {}).
    """
    mask = response_mask.bool()
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return torch.where(mask, -advantages * logps, 0.0), {}


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, response_mask: Tensor, *, clip_range: float
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), per token, negated:

        ratio_t = π_θ(y_t) / π_old(y_t)
        loss_t  = max(−A_t · ratio_t, −A_t · clip(ratio_t, 1 − ε, 1 + ε))

    Args:
        logps: [B, T] under the current policy (with grad); old_logps: [B, T] under the policy that
        sampled the rollout (recomputed by the training forward); advantages: [B, T] (e.g. whitened
        GAE); response_mask: Bool[B, T]; clip_range: ε (0.2 is the common choice).
    Returns:
        losses [B, T]; metrics (detached, per token, 0 outside the mask):
        ``clipfrac``: 1.0 where the clipped term is the max, i.e. where this token's gradient is zero;
        ``approx_kl``: (ratio − 1) − log ratio, the k3 estimate of KL(π_old‖π_θ) from tokens sampled by
            π_old (Schulman's estimator; ≥ 0; the early-stop signal);
        ``ratio``.
    """
    mask = response_mask.bool()
    advantages = advantages.detach()
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    losses = torch.where(mask, torch.maximum(unclipped, clipped), 0.0)
    with torch.no_grad():
        metrics = {
            "clipfrac": _float_mask(mask & (clipped > unclipped), ratio),
            "approx_kl": torch.where(mask, torch.expm1(log_ratio) - log_ratio, 0.0),
            "ratio": torch.where(mask, ratio, 0.0),
        }
    return losses, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, *, clip_range_value: float
) -> tuple[Tensor, Metrics]:
    """Clipped value loss (PPO2 baselines implementation; Huang et al. 2022, "The 37 implementation
    details of PPO", detail 9), per token:

        v_clip = v_old + clip(v − v_old, −ε_v, ε_v)
        loss_t = ½ · max((v − R)², (v_clip − R)²)

    Args: values [B, T] (with grad), old_values [B, T] (from the rollout), returns [B, T] (``gae``),
    response_mask Bool[B, T], clip_range_value ε_v (in reward units, so it depends on reward scale).
    Returns: losses [B, T]; metrics ``vf_clipfrac`` (1.0 where the clipped term is the max).
    """
    mask = response_mask.bool()
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    losses = torch.where(mask, 0.5 * torch.maximum(unclipped, clipped), 0.0)
    with torch.no_grad():
        metrics = {"vf_clipfrac": _float_mask(mask & (clipped > unclipped), values)}
    return losses, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy H = −Σ_v p_v log p_v of softmax(logits) over the last dim: [..., V] -> [...].

    Computed in float32 at least from log_softmax (no log of a rounded-to-zero probability); −inf
    logits (banned tokens) contribute 0 to the value and a finite (zero) gradient.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # masked_fill (not where/mul) so that 0·(−inf) never appears in the forward or the backward.
    logp = logp.masked_fill(p == 0, 0.0)
    return -(p * logp).sum(dim=-1)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[R − V] / Var[R] over the masked entries (0-dim): 1 = perfect value predictions, 0 = no
    better than predicting the mean return, < 0 = worse. NaN when the returns have no variance."""
    mask = mask.bool()
    dtype = torch.promote_types(torch.promote_types(values.dtype, returns.dtype), torch.float32)
    values, returns = values.to(dtype), returns.to(dtype)
    count = mask.sum().clamp(min=1)

    def var(x: Tensor) -> Tensor:
        mean = torch.where(mask, x, 0.0).sum() / count
        return torch.where(mask, (x - mean).square(), 0.0).sum() / count

    var_returns = var(returns)
    if var_returns == 0:
        return torch.tensor(float("nan"), dtype=dtype)
    return 1.0 - var(returns - values) / var_returns
