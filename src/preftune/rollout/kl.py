"""KL(π‖π_ref) per token, and the KL coefficient β (seed 000 "Regularized Objective").

Estimators (J. Schulman, "Approximating KL Divergence", 2020, joschu.net/blog/kl-approx.html). For a
token y sampled from π, with log-ratio ``r = log π_ref(y) − log π(y)`` (= ref_logps − logps):

    k1 = −r                = logp − ref_logp                         unbiased, high variance, can be < 0
    k2 = ½ r²              = ½ (logp − ref_logp)²                    biased (small bias when π ≈ π_ref), ≥ 0
    k3 = (e^r − 1) − r     = (exp(ref_logp − logp) − 1) − (ref_logp − logp)   unbiased, ≥ 0, low variance

E_π[k1] = E_π[k3] = KL(π‖π_ref) exactly; E_π[k2] = KL + O(r³). The samples must come from π (the
policy that produced the rollout), otherwise none of these is unbiased.

Used as a reward penalty (``advantages.token_level_rewards``) the estimate is detached and any of the
three works. Used as a differentiable loss term, their gradients differ (expectations over y ~ π,
holding the sampling fixed): ∇k1 averages to 0; ∇k2 averages to ∇KL(π‖π_ref); ∇k3 averages to
∇KL(π_ref‖π), the reverse KL (what GRPO's k3 loss term actually optimises).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def _masked(kl: Tensor, response_mask: Tensor | None) -> Tensor:
    return kl if response_mask is None else torch.where(response_mask.bool(), kl, 0.0)


def kl_k1(logps: Tensor, ref_logps: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """k1 = logp − ref_logp. Args: logps, ref_logps [B, T] (log-probs of the sampled tokens); optional
    response_mask Bool[B, T] zeroes the other positions. Returns [B, T]."""
    return _masked(logps - ref_logps, response_mask)


def kl_k2(logps: Tensor, ref_logps: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """k2 = ½(logp − ref_logp)². Shapes as ``kl_k1``."""
    return _masked(0.5 * (logps - ref_logps).square(), response_mask)


def kl_k3(logps: Tensor, ref_logps: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """k3 = (exp(ref_logp − logp) − 1) − (ref_logp − logp). Shapes as ``kl_k1``.

    expm1 keeps it exact near π = π_ref, where exp(r) − 1 would cancel; it is ≥ 0 for every input
    (e^r ≥ 1 + r). Unmasked garbage may overflow to inf: pass ``response_mask`` or mask afterwards
    with ``torch.where`` (never by multiplying, inf·0 = NaN).
    """
    log_ratio = ref_logps - logps
    return _masked(torch.expm1(log_ratio) - log_ratio, response_mask)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(
    logps: Tensor, ref_logps: Tensor, kind: Literal["k1", "k2", "k3"], response_mask: Tensor | None = None
) -> Tensor:
    """Per-token KL(π‖π_ref) estimate of the given ``kind`` ("k1" | "k2" | "k3"). Returns [B, T]."""
    try:
        fn = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(KL_ESTIMATORS)}") from None
    return fn(logps, ref_logps, response_mask)


class FixedKLController:
    """A constant β. Same interface as ``AdaptiveKLController`` so the trainer never asks which."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL toward ``target`` (Ziegler et al. 2019,
    arXiv:1909.08593, §2.2 eq. 2; the lm-human-preferences / TRL form):

        e = clip(KL / target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    ``n_steps`` is how many samples (rollout episodes, not optimizer steps) went into the batch since
    the last update, and ``horizon`` is in the same unit; the paper's K_β = n_steps / horizon.
    ``current_kl`` is the mean per-SEQUENCE KL (summed over response tokens), as in the paper.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be > 0 for an adaptive controller, got {init_kl_coef}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        # Only β is state; target and horizon stay as configured (a resumed run may change them).
        self.value = float(state["value"])
