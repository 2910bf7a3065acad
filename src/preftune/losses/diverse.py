"""Losses for diverse preferences: when annotators want different things (seed 000's assignment,
"Analyze the case with diverse human preferences").

- ``weighted_bradley_terry_loss``: w · −log σ(r_w − r_l), the M-step of a BT mixture.
- ``mixture_responsibilities`` / ``fit_bt_mixture``: EM for a mixture of K Bradley–Terry models when
  the groups are unknown (Chakraborty et al. 2024, "MaxMin-RLHF", §4, Algorithm 1): an annotator's
  responsibility for component k is proportional to π_k · Π_{their pairs} σ(r_k(y_w) − r_k(y_l)).
- ``group_robust_dpo_loss`` / ``group_robust_weights``: group-robust DPO (Ramesh et al. 2024, "Group
  Robust Preference Optimization in Reward-free RLHF", Algorithm 1): min_θ max_α Σ_g α_g · L_g(θ),
  α updated by exponentiated gradient, α_g ← α_g · exp(η · L_g), then normalised.
- ``mean_variance_preference_loss``: distributional preference learning's mean-and-variance reward
  (Siththaranjan et al. 2023): P(y_w ≻ y_l) = Φ((μ_w − μ_l)/√(σ_w² + σ_l²)); σ flags contested prompts.
- ``aggregate_rewards``: several rewards -> one, utilitarian ``mean``, MaxMin-RLHF's egalitarian
  ``min`` (eq. 6), or ``weighted``.

Pure functions: tensors and floats in, tensors out; no config objects, no modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.preference import dpo_loss
from preftune.losses.reward import bradley_terry_loss

Metrics = dict[str, Tensor]

AGGREGATIONS = ("mean", "min", "weighted")


def weighted_bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, weights: Tensor) -> tuple[Tensor, Metrics]:
    """w · −log σ(r_w − r_l) per pair: the responsibility-weighted BT of the mixture's M-step.

    Args:
        chosen_rewards, rejected_rewards: Tensor[B] (or [B, K] for K components at once).
        weights: Tensor broadcastable to them, w ≥ 0 (a pair's responsibility under the component).

    Returns:
        losses like the rewards; the metrics of ``bradley_terry_loss`` (unweighted) plus ``weights``.
    """
    losses, metrics = bradley_terry_loss(chosen_rewards, rejected_rewards)
    weights = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
    return weights * losses, {**metrics, "weights": weights.detach().expand_as(losses)}


def mixture_responsibilities(pair_log_likelihood: Tensor, annotator_index: Tensor, num_annotators: int,
                             log_prior: Tensor | None = None) -> Tensor:
    """E-step: γ[a, k] = P(annotator a belongs to component k | their labels).

    log γ[a, k] = log π_k + Σ_{pairs i of a} log σ(r_k(x_i, y_w) − r_k(x_i, y_l)) − log Z_a.

    Args:
        pair_log_likelihood: Tensor[N, K], log σ(r_k(y_w) − r_k(y_l)) of each pair under each component.
        annotator_index: LongTensor[N], the annotator (0..A-1) who labelled each pair.
        num_annotators: A.
        log_prior: Tensor[K], log π_k; None = uniform.

    Returns:
        Tensor[A, K], rows summing to 1 (an annotator without pairs gets the prior).
    """
    n, k = pair_log_likelihood.shape
    totals = pair_log_likelihood.new_zeros(num_annotators, k).index_add_(0, annotator_index.long(), pair_log_likelihood)
    if log_prior is None:
        log_prior = pair_log_likelihood.new_full((k,), -math.log(k))
    return torch.softmax(totals + log_prior, dim=-1)


def mixture_log_likelihood(pair_log_likelihood: Tensor, annotator_index: Tensor, num_annotators: int,
                           log_prior: Tensor) -> Tensor:
    """The observed-data log-likelihood of a BT mixture: Σ_a log Σ_k π_k · Π_{pairs i of a} σ(Δ_k(i)).

    Args: as ``mixture_responsibilities`` (``log_prior`` required). Returns Tensor[] (EM never lowers it).
    """
    k = pair_log_likelihood.shape[1]
    totals = pair_log_likelihood.new_zeros(num_annotators, k).index_add_(0, annotator_index.long(), pair_log_likelihood)
    return (totals + log_prior).logsumexp(-1).sum()


def annotator_directions(feature_differences: Tensor, annotator_index: Tensor, num_annotators: int) -> Tensor:
    """Each annotator's preferred direction in feature space, to start a mixture from the data.

    d_a = mean over a's pairs of h(x, y_w) − h(x, y_l): the direction a linear BT reward r = w·h of a's
    pairs alone climbs first (the gradient of their BT log-likelihood at w = 0 is Σ_i d_i / 2). The
    directions are centred over annotators (what everyone shares says nothing about who differs) and
    scaled to unit length; an annotator without pairs gets 0.

    Args:
        feature_differences: Tensor[N, H], h(x_i, y_w) − h(x_i, y_l) per pair.
        annotator_index: LongTensor[N].

    Returns:
        Tensor[A, H].
    """
    idx = annotator_index.long()
    sums = feature_differences.new_zeros(num_annotators, feature_differences.shape[1]).index_add_(0, idx, feature_differences)
    counts = torch.bincount(idx, minlength=num_annotators).to(sums.dtype)
    means = sums / counts.clamp(min=1)[:, None]
    centred = means - means[counts > 0].mean(0, keepdim=True)
    centred[counts == 0] = 0
    return F.normalize(centred, dim=-1)


def spherical_kmeans(points: Tensor, num_clusters: int, *, iterations: int = 50, restarts: int = 8,
                     seed: int = 0) -> Tensor:
    """k-means on the unit sphere (cosine similarity), k-means++ starts, the best of ``restarts``
    (highest total similarity to the assigned centres). Deterministic for a seed.

    Args:
        points: Tensor[A, H] (normalised inside).
        num_clusters: K ≤ A.

    Returns:
        LongTensor[A], each point's cluster 0..K-1; every cluster non-empty, numbered by first member.
    """
    a = points.shape[0]
    if not 1 <= num_clusters <= a:
        raise ValueError(f"{num_clusters} clusters for {a} points; need 1 <= K <= {a}")
    x = F.normalize(points.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    best, best_score = None, -math.inf
    for _ in range(restarts):
        centres = x[_kmeanspp(x, num_clusters, gen)]
        for _ in range(iterations):
            labels = (x @ centres.T).argmax(-1)
            new = F.normalize(torch.stack([x[labels == c].sum(0) for c in range(num_clusters)]), dim=-1)
            empty = torch.bincount(labels, minlength=num_clusters) == 0
            new[empty] = centres[empty]
            if torch.equal(new, centres):
                break
            centres = new
        score = float((x * centres[labels]).sum())
        if labels.unique().numel() == num_clusters and score > best_score + 1e-6:
            best, best_score = labels, score
    if best is None:
        raise ValueError(f"could not split {a} points into {num_clusters} non-empty clusters (too many equal points)")
    first = {}
    for c in best.tolist():
        first.setdefault(c, len(first))
    return torch.tensor([first[c] for c in best.tolist()])


def _kmeanspp(x: Tensor, k: int, gen: torch.Generator) -> list[int]:
    """k-means++ seeding on the sphere: each next centre drawn ∝ (1 − max cosine to the chosen)²."""
    chosen = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    for _ in range(k - 1):
        dist = (1 - (x @ x[chosen].T).max(-1).values).clamp(min=0).square()
        dist[chosen] = 0
        if float(dist.sum()) <= 0:
            remaining = [i for i in range(x.shape[0]) if i not in chosen]
            chosen.append(remaining[int(torch.randint(len(remaining), (1,), generator=gen))])
            continue
        chosen.append(int(torch.multinomial(dist, 1, generator=gen)))
    return chosen


def fit_bt_mixture(chosen_items: Tensor, rejected_items: Tensor, annotator_index: Tensor, *, num_items: int,
                   num_annotators: int, num_components: int, features: Tensor | None = None, iterations: int = 30,
                   m_steps: int = 50, lr: float = 0.5, restarts: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """EM for a mixture of K tabular Bradley–Terry models (one free reward per item per component), or,
    with ``features`` (Tensor[num_items, F]), of K linear ones: r_k(item) = features[item] · w_k.

    The same E-step (``mixture_responsibilities``) and M-step (``weighted_bradley_terry_loss`` with the
    annotator's responsibility as each pair's weight, minimised by Adam) that the neural reward mixture
    uses, on a reward table instead of a network, so it can be checked against known reward vectors.
    EM finds a local optimum and the labels of components are arbitrary: ``restarts`` random starts,
    the one with the highest log-likelihood kept.

    Args:
        chosen_items, rejected_items: LongTensor[N], item ids (0..num_items-1) of each pair.
        annotator_index: LongTensor[N].

    Returns:
        {"rewards": Tensor[K, num_items] (each component centred to mean 0), "responsibilities":
        Tensor[A, K], "prior": Tensor[K], "log_likelihood": Tensor[] (the observed-data log-likelihood)},
        plus "weights": Tensor[K, F] with ``features``.
    """
    if num_components > num_annotators:
        raise ValueError(f"{num_components} mixture components for {num_annotators} annotators: each component needs "
                         f"annotators of its own; use at most {num_annotators}")
    if restarts < 1 or iterations < 1:
        raise ValueError(f"need restarts >= 1 and iterations >= 1, got {restarts} and {iterations}")
    gen = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        gamma = (3 * torch.rand(num_annotators, num_components, generator=gen)).softmax(-1)
        params = torch.zeros(num_components, num_items if features is None else features.shape[1])
        for _ in range(iterations):
            prior = gamma.mean(0).clamp(min=1e-6)
            params = _m_step(params, features, chosen_items, rejected_items, gamma[annotator_index], m_steps, lr)
            with torch.no_grad():
                rewards = params if features is None else params @ features.T
                loglik = _pair_log_likelihood(rewards, chosen_items, rejected_items)
                gamma = mixture_responsibilities(loglik, annotator_index, num_annotators, prior.log())
        observed = mixture_log_likelihood(loglik, annotator_index, num_annotators, prior.log())
        if best is None or observed > best["log_likelihood"]:
            centred = rewards - rewards.mean(-1, keepdim=True)
            best = {"rewards": centred, "responsibilities": gamma, "prior": prior, "log_likelihood": observed}
            if features is not None:
                best["weights"] = params
    return best


def _pair_log_likelihood(rewards: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
    """[N, K]: log σ(r_k[chosen_i] − r_k[rejected_i])."""
    return F.logsigmoid(rewards[:, chosen] - rewards[:, rejected]).T


def _m_step(params: Tensor, features: Tensor | None, chosen: Tensor, rejected: Tensor, weights: Tensor, steps: int,
            lr: float) -> Tensor:
    params = params.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        rewards = params if features is None else params @ features.T
        losses, _ = weighted_bradley_terry_loss(rewards[:, chosen].T, rewards[:, rejected].T, weights)
        # A small L2 pull: a pair set with a perfectly separable order has no finite BT optimum.
        (losses.sum() / len(chosen) + 1e-3 * params.square().mean()).backward()
        opt.step()
    return params.detach()


def mean_variance_preference_loss(chosen_mean: Tensor, chosen_std: Tensor, rejected_mean: Tensor,
                                  rejected_std: Tensor) -> tuple[Tensor, Metrics]:
    """Distributional preference learning, the mean-and-variance model (Siththaranjan et al. 2023,
    "Distributional Preference Learning: Understanding and Accounting for Hidden Context in RLHF", §4):
    a completion's utility over the hidden context (e.g. who is asked) is u(y) ~ N(μ(y), σ(y)²), so

        P(y_w ≻ y_l) = Φ((μ_w − μ_l) / √(σ_w² + σ_l²)),   loss = −log Φ(z).

    A large σ marks a completion whose value depends on whom you ask (a contested prompt); μ is the
    reward. (The paper's code trains −log σ(√(2π)·z), a logistic stand-in for Φ; this is Φ itself.)

    Args:
        chosen_mean, rejected_mean: Tensor[B], μ; chosen_std, rejected_std: Tensor[B], σ > 0.

    Returns:
        losses Tensor[B]; metrics: accuracies (μ_w > μ_l), margins (μ_w − μ_l), log_likelihood (log Φ(z)),
        pair_std (√(σ_w² + σ_l²)).
    """
    pair_std = (chosen_std.square() + rejected_std.square()).sqrt()
    margins = chosen_mean - rejected_mean
    log_likelihood = torch.special.log_ndtr(margins / pair_std)
    metrics = {"accuracies": (margins > 0).to(margins.dtype), "margins": margins.detach(),
               "log_likelihood": log_likelihood.detach(), "pair_std": pair_std.detach()}
    return -log_likelihood, metrics


def group_robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    groups: Tensor,
    group_weights: Tensor,
    group_counts: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """Group-robust DPO (Ramesh et al. 2024, eq. 8 / Algorithm 1): Σ_g α_g · mean_{i ∈ g} ℓ_DPO(i).

    Per row the loss is α_{g_i} · ℓ_DPO(i) · N / n_{g_i}, N = Σ_g n_g the rows of the global batch and
    n_g those of group g, so that summing over the global batch and dividing by N (what the loop does)
    gives Σ_g α_g · (mean DPO loss of group g). With one group (α = [1]) it is exactly DPO.

    Args:
        policy_*_logps, reference_*_logps: Tensor[B], as in ``dpo_loss``.
        groups: LongTensor[B], each row's group 0..G-1.
        group_weights: Tensor[G], α (≥ 0, summing to 1).
        group_counts: Tensor[G], n_g: rows of each group in the whole global batch (not the micro-batch).

    Returns:
        losses Tensor[B]; the metrics of ``dpo_loss`` plus ``dpo_losses`` (the unweighted ℓ_DPO per row,
        for the α update).
    """
    losses, metrics = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=beta)
    counts = group_counts.to(losses.dtype)
    scale = group_weights.to(losses.dtype)[groups] * counts.sum() / counts[groups].clamp(min=1)
    return scale * losses, {**metrics, "dpo_losses": losses.detach()}


def group_robust_weights(group_weights: Tensor, group_losses: Tensor, *, step_size: float,
                         present: Tensor | None = None) -> Tensor:
    """The exponentiated-gradient step of GRPO's adversary: α_g ← α_g · exp(η · L_g), normalised.

    Args:
        group_weights: Tensor[G], α before the step.
        group_losses: Tensor[G], L_g, the mean loss of each group on the current batch.
        step_size: η ≥ 0 (0 keeps α).
        present: BoolTensor[G], groups that have rows in the batch; absent groups keep their α_g
            (before normalisation).
    """
    step = step_size * group_losses.to(group_weights.dtype)
    if present is not None:
        step = torch.where(present, step, torch.zeros_like(step))
    # In log space: exp(η·L) overflows for large losses, and only the ratios matter.
    log_w = group_weights.clamp(min=1e-30).log() + step
    return torch.softmax(log_w, dim=0)


def aggregate_rewards(rewards: Tensor, rule: str = "mean", weights: Tensor | None = None) -> Tensor:
    """Several rewards of the same rows -> one reward per row.

    Args:
        rewards: Tensor[R, B], reward r of each row under each of R reward sources (e.g. one per group).
        rule: 'mean' (utilitarian: Σ_r r / R), 'min' (egalitarian, MaxMin-RLHF eq. 6: the worst-off
            group's reward; its gradient reaches only that group's reward), 'weighted' (Σ_r w_r · r).
        weights: Tensor[R] for 'weighted' (need not sum to 1).

    Returns:
        Tensor[B].
    """
    if rule == "mean":
        return rewards.mean(0)
    if rule == "min":
        return rewards.min(0).values
    if rule == "weighted":
        if weights is None or weights.shape != rewards.shape[:1]:
            raise ValueError(f"rule 'weighted' needs one weight per reward ({rewards.shape[0]}), got "
                             f"{None if weights is None else tuple(weights.shape)}")
        return (weights.to(rewards.dtype)[:, None] * rewards).sum(0)
    raise ValueError(f"unknown aggregation {rule!r}; expected one of {', '.join(AGGREGATIONS)}")
