"""Reward-model losses: Bradley–Terry on pairs, Plackett–Luce on rankings, reward centring.

Seed 000 ("Reward model"): a scalar r_φ(x, y) is trained so that the preferred completion scores
higher, by minimising −log σ(r_φ(x, y_w) − r_φ(x, y_l)) (InstructGPT, Ouyang et al. 2022, eq. 1).
Plackett–Luce (Plackett 1975, Luce 1959) is the K-wise generalisation: a ranking is drawn by
repeatedly picking the best remaining completion with probability softmax(r) over what is left; for
K = 2 it is exactly Bradley–Terry.

Pure functions, as everywhere in ``preftune.losses``: tensors in, ``(losses, metrics)`` out, where
``losses`` is Tensor[B] (one value per pair or ranking; the caller sums, the loop divides by the
rows of the global batch) and ``metrics`` a dict of detached per-row Tensor[B].
Losses are computed in at least fp32 whatever the rewards' dtype (bf16 autocast gives bf16 scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]

MAX_TIE_GROUP = 8
"""Largest tie group (other than the last one) the exact Plackett–Luce tie likelihood handles: its
cost is O(2^g · g) for a group of g tied completions."""


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: Tensor | float | None = None
) -> tuple[Tensor, Metrics]:
    """Bradley–Terry: −log σ(r_w − r_l − m) (seed 000 / InstructGPT eq. 1; margin m from Llama 2, eq. 2).

    Args:
        chosen_rewards: Tensor[B], r(x, y_w).
        rejected_rewards: Tensor[B], r(x, y_l).
        margin: Tensor[B] or float, a per-pair margin m ≥ 0 that the chosen reward must exceed
            ("significantly better" pairs get a larger m); None = 0.

    Returns:
        losses Tensor[B]; metrics (per row): ``chosen_rewards``, ``rejected_rewards``, ``margins``
        (r_w − r_l), ``accuracies`` (1.0 where r_w > r_l; a tie counts as wrong) and
        ``log_likelihood`` (log σ(r_w − r_l), the BT log-likelihood of the label, without m).

    ∂loss/∂r_w = −σ(−(r_w − r_l − m)) = −∂loss/∂r_l.
    """
    chosen, rejected = _upcast(chosen_rewards), _upcast(rejected_rewards)
    diff = chosen - rejected
    logits = diff if margin is None else diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    losses = -F.logsigmoid(logits)
    metrics = {
        "chosen_rewards": chosen.detach(),
        "rejected_rewards": rejected.detach(),
        "margins": diff.detach(),
        "accuracies": (diff > 0).to(diff.dtype).detach(),
        "log_likelihood": F.logsigmoid(diff).detach(),
    }
    return losses, metrics


def centering_penalty(rewards: Tensor, coef: float, mask: Tensor | None = None) -> Tensor:
    """Reward centring (Eisenstein et al. 2023, "Helping or Herding?", §3): coef · (Σ_k r_k)².

    BT and PL only see reward differences, so the offset of r drifts freely; this auxiliary term
    pins the rewards of each pair (or ranking) to sum to ~0. For a pair it is coef · (r_w + r_l)²,
    as in TRL's ``center_rewards_coefficient``.

    Args:
        rewards: Tensor[B, K], the rewards of the K completions of each row (K = 2 for a pair).
        coef: weight (0 gives zeros); the paper and TRL use 0.01.
        mask: BoolTensor[B, K], False for absent completions (padding of ragged rankings).

    Returns:
        Tensor[B], one penalty per row.
    """
    rewards = _upcast(rewards)
    if mask is not None:
        rewards = rewards.masked_fill(~mask, 0.0)
    return coef * rewards.sum(-1).square()


def plackett_luce_loss(rewards: Tensor, tie_levels: Tensor) -> tuple[Tensor, Metrics]:
    """Negative Plackett–Luce log-likelihood of rankings with ties.

    Args:
        rewards: Tensor[B, K], the reward of each completion of each ranking.
        tie_levels: LongTensor[B, K], the completion's tie group, 0 = best group, larger = worse
            (need not be consecutive); -1 marks an absent completion (padding of rankings with
            fewer than K completions).

    Tie convention: tied completions form an unordered group, and the likelihood is the exact
    probability, under Plackett–Luce, of every ordering that agrees with the groups:

        P(G_1 > G_2 > … > G_m) = Π_j P(the next |G_j| picks from R_j are the members of G_j, in any order),

    R_j = G_j ∪ G_{j+1} ∪ … (memorylessness of PL makes the stages independent). A singleton group
    gives the usual softmax term exp(r_i) / Σ_{k∈R_j} exp(r_k); a tie group sums over its orderings
    (a dynamic programme over subsets, O(2^g · g)). The last group contributes nothing (whatever is
    left is picked), so a ranking whose completions are all tied carries no signal and ties among
    the worst completions are unconstrained -- the same information ``rankings_to_pairs`` extracts
    (ties give no pair). Unlike splitting the group's probability mass ("pick any member first"),
    every member of a tie group must beat every worse completion. For K = 2 without ties this is
    exactly ``bradley_terry_loss``.

    Returns:
        losses Tensor[B]; metrics (per row): ``log_likelihood`` (= −loss), ``ordered_pairs`` (strictly
        ordered (better, worse) pairs in the ranking), ``correct_pairs`` (those with r_better >
        r_worse) and ``margin_sum`` (Σ r_better − r_worse over them); pairwise accuracy over a batch
        is Σ correct_pairs / Σ ordered_pairs.
    """
    if rewards.shape != tie_levels.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and tie_levels must both be [B, K], got {tuple(rewards.shape)} and {tuple(tie_levels.shape)}")
    r = _upcast(rewards)
    levels = tie_levels.long()
    valid = levels >= 0
    b, k = r.shape
    eye = torch.eye(k, dtype=torch.bool, device=r.device)
    # risk[b, i, j]: completion j is still unpicked when i's group is picked (level_j >= level_i).
    risk = valid[:, None, :] & valid[:, :, None] & (levels[:, None, :] >= levels[:, :, None])
    same = valid[:, None, :] & valid[:, :, None] & (levels[:, None, :] == levels[:, :, None])
    group_size, risk_size = same.sum(-1), risk.sum(-1)
    # The diagonal keeps every logsumexp finite (absent i), so the backward pass never sees NaN.
    lse = torch.where(risk | eye, r[:, None, :], torch.full_like(r[:, None, :], float("-inf"))).logsumexp(-1)
    singleton = valid & (group_size == 1) & (risk_size > 1)
    terms = torch.where(singleton, r - lse, torch.zeros_like(r))
    log_lik = terms.sum(-1)
    tied = valid & (group_size > 1) & (risk_size > group_size)
    if bool(tied.any()):
        log_lik = log_lik + _tied_groups_log_lik(r, levels, valid, tied)

    better = valid[:, :, None] & valid[:, None, :] & (levels[:, :, None] < levels[:, None, :])
    diffs = r[:, :, None] - r[:, None, :]
    metrics = {
        "log_likelihood": log_lik.detach(),
        "ordered_pairs": better.sum((1, 2)).to(r.dtype),
        "correct_pairs": (better & (diffs > 0)).sum((1, 2)).to(r.dtype),
        "margin_sum": torch.where(better, diffs, torch.zeros_like(diffs)).sum((1, 2)).detach(),
    }
    return -log_lik, metrics


def _upcast(x: Tensor) -> Tensor:
    """bf16/fp16 rewards -> fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _tied_groups_log_lik(r: Tensor, levels: Tensor, valid: Tensor, tied: Tensor) -> Tensor:
    """Σ over tie groups (not last) of log P(the group's members are the next |G| picks), per row."""
    out = [torch.zeros((), dtype=r.dtype, device=r.device) for _ in range(r.shape[0])]
    for row in sorted(set(tied.nonzero()[:, 0].tolist())):
        for level in sorted(set(levels[row][tied[row]].tolist())):
            members = ((levels[row] == level) & valid[row]).nonzero()[:, 0]
            rest = ((levels[row] > level) & valid[row]).nonzero()[:, 0]
            out[row] = out[row] + _log_prob_set_first(r[row, members], r[row, rest])
    return torch.stack(out)


def _log_prob_set_first(group: Tensor, rest: Tensor) -> Tensor:
    """log P(the first g picks from group ∪ rest are exactly ``group``), group: [g], rest: [n].

    f(T) = probability that the first |T| picks are the set T ⊆ group:
    f(∅) = 1, f(T) = Σ_{i∈T} f(T \\ {i}) · exp(r_i) / Σ_{k ∉ T \\ {i}} exp(r_k).
    """
    g = group.shape[0]
    if g > MAX_TIE_GROUP:
        raise ValueError(
            f"a tie group of {g} completions ranked above others: the exact Plackett-Luce tie likelihood "
            f"handles at most {MAX_TIE_GROUP}; use loss=bt (ties give no pair) or break the tie"
        )
    log_f: list[Tensor] = [group.new_zeros(())] + [group.new_zeros(())] * ((1 << g) - 1)
    # Log of the total weight still unpicked after the group members in `mask` are gone.
    log_left = []
    for mask in range(1 << g):
        keep = [group[i] for i in range(g) if not mask >> i & 1]
        log_left.append(torch.cat([torch.stack(keep) if keep else group.new_zeros(0), rest]).logsumexp(0))
    for mask in range(1, 1 << g):
        parts = [log_f[mask ^ (1 << i)] + group[i] - log_left[mask ^ (1 << i)] for i in range(g) if mask >> i & 1]
        log_f[mask] = torch.stack(parts).logsumexp(0)
    return log_f[(1 << g) - 1]
