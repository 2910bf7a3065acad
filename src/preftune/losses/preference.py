"""Pairwise preference losses: DPO and its relatives (seed 000 "Direct Preference Optimization",
seed 002 "DPO gradient").

Every loss here is a pure function of per-row tensors and floats and returns ``(losses, metrics)``:

- ``losses``: Tensor[B], one value per (prompt, chosen, rejected) row. The caller sums them and the
  training loop divides by the number of rows in the global batch.
- ``metrics``: dict[str, Tensor[B]] of detached per-row values (the caller sums them too):
  ``chosen_rewards``, ``rejected_rewards``, ``margins`` (chosen − rejected), ``accuracies`` (1.0 where
  chosen_rewards > rejected_rewards), and for the logistic and hinge losses ``grad_weights``.

Names follow the DPO reference code (eric-mitchell/direct-preference-optimization):
``policy_chosen_logps`` etc. are log π(y | x) summed over the completion tokens, shape [B], unless a
docstring says the caller must pass length-averaged log-probs.

``grad_weights`` is −∂loss/∂z, z being the logit inside the sigmoid (β·h for DPO). For DPO it is
σ(r̂_l − r̂_w): seed 002's "higher weight when the reward estimate is wrong", so that
∂loss/∂policy_chosen_logps = −β·grad_weights. For the noise-aware variants it is the exact mixture,
which can be negative for cDPO: that is how cDPO stops pushing a pair it already ranks confidently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]

# Upper bound on a log-probability before computing log(1 − p): p = 1 exactly would give log(0).
_MAX_LOGP = -1e-6


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate everywhere (Mächler 2012, "Accurately computing log(1 − exp(−|a|))").

    Near 0, 1 − exp(x) cancels catastrophically, so use −expm1(x); far below, exp(x) underflows and
    log1p(−exp(x)) is exact. x is clamped to ≤ −1e-6 so that p = 1 gives a large finite value
    (≈ −13.8), not −inf; the clamp also stops the gradient there.
    """
    x = x.clamp(max=_MAX_LOGP)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _metric_dtype(x: Tensor) -> torch.dtype:
    # Indicators are summed over many rows by the caller: never in bf16/fp16 (exact only up to 256/2048).
    return torch.promote_types(x.dtype, torch.float32)


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, **extra: Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracies": (chosen_rewards > rejected_rewards).to(_metric_dtype(chosen_rewards)),
    }
    metrics.update({k: v.detach() for k, v in extra.items()})
    return metrics


def _logratios(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
               reference_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """(log π_θ/π_ref of chosen, of rejected)."""
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """DPO, Rafailov et al. 2023, eq. 7:

        −log σ(β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))])

    Args:
        policy_*_logps, reference_*_logps: Tensor[B], summed log-probs of each completion.
        beta: KL strength (0.1 in the paper's dialogue experiments).
    Returns:
        losses [B]; metrics with implicit rewards r̂ = β(log π_θ − log π_ref) and
        grad_weights = σ(r̂_l − r̂_w), so (seed 002)
        ∇loss = −β·grad_weights·(∇log π(y_w) − ∇log π(y_l)).
    At π_θ = π_ref every loss is ln 2.
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (chosen_lr - rejected_lr)
    losses = -F.logsigmoid(z)  # logsigmoid, not log(sigmoid): finite for z ≪ 0
    return losses, _pair_metrics(beta * chosen_lr, beta * rejected_lr, grad_weights=torch.sigmoid(-z))


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Metrics]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO"):

        −(1 − ε) log σ(βh) − ε log σ(−βh),   h = (log π_θ/π_ref)(y_w) − (log π_θ/π_ref)(y_l)

    i.e. DPO's cross-entropy against a label that is right with probability 1 − ε. ε = 0 is DPO.
    Its minimum is at σ(βh) = 1 − ε, so it stops pushing a pair once it is ranked confidently.

    Args: as ``dpo_loss``; label_smoothing = ε ∈ [0, 0.5), the assumed label-flip rate.
    Returns: losses [B]; metrics as DPO, grad_weights = −∂loss/∂(βh) = (1 − ε)σ(−βh) − εσ(βh).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    eps = label_smoothing
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (chosen_lr - rejected_lr)
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    grad_weights = (1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z)
    return losses, _pair_metrics(beta * chosen_lr, beta * rejected_lr, grad_weights=grad_weights)


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Metrics]:
    """Robust DPO, Chowdhury, Kini & Natarajan 2024 ("Provably Robust DPO", arXiv:2403.00409, §3):
    the loss that is unbiased for DPO's clean loss when each label is flipped with probability ε,

        [−(1 − ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε).

    Unlike cDPO it is unbounded below in h (it is an unbiased estimate, not a smoothed target), and
    it blows up as ε → 0.5, where the labels carry no information.

    Args: as ``dpo_loss``; label_smoothing = ε ∈ [0, 0.5), the known flip rate. ε = 0 is DPO.
    Returns: losses [B]; metrics as DPO,
        grad_weights = −∂loss/∂(βh) = [(1 − ε)σ(−βh) + εσ(βh)] / (1 − 2ε).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    eps = label_smoothing
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (chosen_lr - rejected_lr)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    grad_weights = ((1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)) / (1 - 2 * eps)
    return losses, _pair_metrics(beta * chosen_lr, beta * rejected_lr, grad_weights=grad_weights)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    tau: float,
) -> tuple[Tensor, Metrics]:
    """IPO, Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human
    Preferences"), eq. 17:  (h − 1/(2τ))²,  h = (log π_θ/π_ref)(y_w) − (log π_θ/π_ref)(y_l).

    The caller passes LENGTH-AVERAGED log-probs (mean over each completion's tokens), as TRL and
    HALOs do: with summed log-probs h grows with length and the fixed target 1/(2τ) means nothing.

    A squared loss regresses h onto 1/(2τ) instead of pushing it to +∞, so it does not overfit
    deterministic preferences (the paper's argument against DPO).

    Args:
        *_logps: Tensor[B], per-token-averaged log-probs.
        tau: regularisation strength τ > 0 (plays β's role; the target gap is 1/(2τ)).
    Returns: losses [B]; metrics with rewards τ·(log π_θ − log π_ref) (averaged log-probs).
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (chosen_lr - rejected_lr - 1 / (2 * tau)) ** 2
    return losses, _pair_metrics(tau * chosen_lr, tau * rejected_lr)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """Hinge loss of SLiC-HF (Zhao et al. 2023, calibration loss max(0, δ − log π(y_w) + log π(y_l))),
    on reference-normalised log-ratios as in RSO (Liu et al. 2024) and TRL's ``loss_type="hinge"``:

        relu(1 − βh),   h = (log π_θ/π_ref)(y_w) − (log π_θ/π_ref)(y_l),   i.e. margin δ = 1/β.

    Args: as ``dpo_loss`` (summed log-probs).
    Returns: losses [B]; metrics as DPO, grad_weights = −∂loss/∂(βh) = 1.0 inside the margin, else 0.
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (chosen_lr - rejected_lr)
    losses = torch.relu(1 - z)
    return losses, _pair_metrics(beta * chosen_lr, beta * rejected_lr, grad_weights=(z < 1).to(_metric_dtype(z)))


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[Tensor, Metrics]:
    """SimPO, Meng et al. 2024 ("SimPO: Simple Preference Optimization with a Reference-Free Reward"), eq. 6:

        −log σ(β/|y_w| · log π_θ(y_w) − β/|y_l| · log π_θ(y_l) − γ)

    Reference-free and length-normalised: the caller passes LENGTH-AVERAGED log-probs.

    Args:
        policy_*_logps: Tensor[B], per-token-averaged log-probs.
        beta: reward scale (the paper uses 2.0–10).
        gamma: target reward margin γ, absolute (TRL's ``simpo_gamma`` is γ/β; here it is γ itself).
    Returns: losses [B]; metrics with rewards β·avg log π_θ, grad_weights = σ(r_l − r_w + γ).
    """
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    z = chosen_rewards - rejected_rewards - gamma
    losses = -F.logsigmoid(z)
    return losses, _pair_metrics(chosen_rewards, rejected_rewards, grad_weights=torch.sigmoid(-z))


def reference_free_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """DPO with a uniform reference (Rafailov et al. 2023, eq. 7 with π_ref constant):

        −log σ(β(log π_θ(y_w) − log π_θ(y_l)))

    A uniform π_ref gives every sequence of a given length the same reference log-prob, which
    cancels between y_w and y_l only when they have the same length; this is the usual convention
    (the reference code's ``reference_free=True``) of simply dropping the reference terms.

    Args: policy_*_logps: Tensor[B], summed log-probs; beta as DPO.
    Returns: losses [B]; metrics with rewards β·log π_θ, grad_weights = σ(r_l − r_w).
    """
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    z = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(z)
    return losses, _pair_metrics(chosen_rewards, rejected_rewards, grad_weights=torch.sigmoid(-z))


def orpo_loss(
    policy_chosen_logps_avg: Tensor,
    policy_rejected_logps_avg: Tensor,
    chosen_nll: Tensor,
    *,
    lam: float,
) -> tuple[Tensor, Metrics]:
    """ORPO, Hong et al. 2024 ("ORPO: Monolithic Preference Optimization without Reference Model"), eqs. 6–7:

        L = L_SFT + λ·L_OR,   L_OR = −log σ(log odds(y_w) − log odds(y_l)),
        odds(y) = P(y)/(1 − P(y)),   P(y) = exp(mean_t log π_θ(y_t | x, y_<t))   (eq. 4).

    log odds(y) = avg_logp − log(1 − exp(avg_logp)), computed with ``log1mexp`` (avg_logp is clamped to
    ≤ −1e-6 so that P = 1 stays finite).

    Args:
        policy_*_logps_avg: Tensor[B], per-token-averaged log-probs (all ≤ 0).
        chosen_nll: Tensor[B], mean NLL per chosen token of each row (the SFT term, with gradient).
        lam: λ, weight of the odds-ratio term (0.1 in the paper).
    Returns:
        losses [B]; metrics: rewards λ·avg log π_θ (what TRL reports as rewards/chosen; ORPO has no
        implicit reward), ``log_odds_ratio``, ``or_loss`` (L_OR, before λ), ``nll``, and
        grad_weights = σ(−log_odds_ratio) = −∂L_OR/∂log_odds_ratio (before λ).
    """
    chosen_log_odds = policy_chosen_logps_avg - log1mexp(policy_chosen_logps_avg)
    rejected_log_odds = policy_rejected_logps_avg - log1mexp(policy_rejected_logps_avg)
    log_odds_ratio = chosen_log_odds - rejected_log_odds
    or_loss = -F.logsigmoid(log_odds_ratio)
    losses = chosen_nll + lam * or_loss
    return losses, _pair_metrics(
        lam * policy_chosen_logps_avg,
        lam * policy_rejected_logps_avg,
        log_odds_ratio=log_odds_ratio,
        or_loss=or_loss,
        nll=chosen_nll,
        grad_weights=torch.sigmoid(-log_odds_ratio),
    )


def _masked_row_mean(values: Tensor, mask: Tensor) -> Tensor:
    # A row with no scored tokens contributes 0 rather than 0/0.
    return torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def unlikelihood_loss(
    policy_chosen_per_token_logps: Tensor,
    chosen_mask: Tensor,
    policy_rejected_per_token_logps: Tensor,
    rejected_mask: Tensor,
    *,
    alpha: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """The "unlikelihood" baseline of seed 000 (token-level unlikelihood: Welleck et al. 2020):
    raise the likelihood of y_w and the unlikelihood log(1 − p) of each token of y_l. No reference
    model, so nothing bounds the push-down — seed 000's "the model can degenerate" — which is what
    DPO's KL-anchored rewards fix. Per row:

        −mean_t log p(y_w,t) − α · mean_t log(1 − p(y_l,t))     (means over that row's masked tokens)

    Args:
        policy_*_per_token_logps: Tensor[B, T], log π(token_t | prefix); any value where the mask is False.
        *_mask: BoolTensor[B, T], True for completion tokens.
        alpha: weight of the unlikelihood term.
    Returns:
        losses [B]; metrics ``chosen_logps`` / ``rejected_logps`` (mean per-token log-prob of each row),
        and chosen/rejected_rewards equal to those means (no reference, so no implicit reward) with
        margins and accuracies. A p = 1 rejected token costs −log(1e-6) ≈ 13.8 (clamped), not inf.
    """
    # Replace unscored positions before log1mexp so that padding (even −inf or 0) cannot put NaN in backward.
    chosen = torch.where(chosen_mask, policy_chosen_per_token_logps, -1.0)
    rejected = torch.where(rejected_mask, policy_rejected_per_token_logps, -1.0)
    chosen_mean_logps = _masked_row_mean(chosen, chosen_mask)
    rejected_mean_logps = _masked_row_mean(rejected, rejected_mask)
    unlikelihood = -_masked_row_mean(log1mexp(rejected), rejected_mask)
    losses = -chosen_mean_logps + alpha * unlikelihood
    return losses, _pair_metrics(
        chosen_mean_logps,
        rejected_mean_logps,
        chosen_logps=chosen_mean_logps,
        rejected_logps=rejected_mean_logps,
    )


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float,
    alpha: float,
) -> tuple[Tensor, Metrics]:
    """RPO, Pang et al. 2024 ("Iterative Reasoning Preference Optimization", arXiv:2404.19733, eqs. 1–3):
    DPO plus a length-normalised NLL term on the chosen response,

        L = −log σ(βh) + α · (−log π_θ(y_w | x) / |y_w|)

    with h as in ``dpo_loss``. The NLL keeps the chosen answer's likelihood from falling, which plain
    DPO allows (both log-probs can drop while their gap grows).

    Args: as ``dpo_loss`` (summed log-probs); chosen_nll [B]: mean NLL per chosen token of each row
    (with gradient); alpha: weight α of the NLL (1.0 in the paper).
    Returns: losses [B]; metrics as DPO plus ``nll`` and ``dpo_loss`` (the DPO term alone).
    """
    dpo, metrics = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta=beta)
    metrics.update(nll=chosen_nll.detach(), dpo_loss=dpo.detach())
    return dpo + alpha * chosen_nll, metrics


def dpop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    lam: float,
) -> tuple[Tensor, Metrics]:
    """DPO-Positive, Pal et al. 2024 ("Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", arXiv:2402.13228, eq. 3):

        −log σ(β[h − λ · max(0, log π_ref(y_w) − log π_θ(y_w))])

    The penalty is zero while the policy keeps at least the reference's likelihood of the chosen
    response, and grows as it falls below it (what DPO permits on pairs with small edit distance).

    Args: as ``dpo_loss``; lam: λ ≥ 0 (the paper uses 5–500; 50 for most runs). λ = 0 is DPO.
    Returns: losses [B]; metrics as DPO plus ``penalty`` (the max(0, ·) term, before λ), and
    grad_weights = σ(−z) for the logit z inside the sigmoid.
    """
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    penalty = torch.relu(-chosen_lr)
    z = beta * (chosen_lr - rejected_lr - lam * penalty)
    losses = -F.logsigmoid(z)
    return losses, _pair_metrics(beta * chosen_lr, beta * rejected_lr, penalty=penalty, grad_weights=torch.sigmoid(-z))
