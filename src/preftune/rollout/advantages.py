"""Advantages and baselines for policy-gradient RLHF (seed 000 "RLHF: Reinforcement Learning").

Pure functions of tensors and floats. Shapes: [B] one value per sampled response, [B, T] one value
per token, with ``response_mask`` BoolTensor[B, T] True on the response tokens the policy generated
(prompt and padding False). Values at unmasked positions are never read: they may be garbage.

Everything returned here is a *target* (an advantage, a return, a shaped reward): it is computed from
detached inputs, so a forgotten ``.detach()`` on a value head never leaks a gradient into the
policy-gradient estimator.

Grouped estimators (``rloo_advantages``, ``group_normalized_advantages``) take rewards in
prompt-major order: the k samples of prompt p are rows p·k … p·k + k − 1, which is the order of
``prompts.repeat_interleave(k)`` (TRL's old ``RLOOTrainer`` used the other order, [k, P]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Added to the variance before the square root in whitening (as in TRL / torchtune `whiten`).
_WHITEN_EPS = 1e-8


def _stat_dtype(x: Tensor) -> torch.dtype:
    # Statistics in float32 at least: bf16 sums of a few thousand tokens lose most of their digits.
    return torch.promote_types(x.dtype, torch.float32)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is True (all of them, or along ``dim``).

    Args: x [*], mask Bool[*] (same shape). Returns a 0-dim tensor, or x reduced along ``dim``.
    The count is clamped to 1, so an all-False mask (or slice) gives 0, not NaN.
    """
    mask = mask.bool()
    x = x.to(_stat_dtype(x))
    total = torch.where(mask, x, 0.0).sum() if dim is None else torch.where(mask, x, 0.0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked entries (0-dim). ``unbiased``: divide by n − 1 (Bessel).

    Raises ValueError when the mask selects no entry, or one entry with ``unbiased=True``.
    """
    mask = mask.bool()
    n = int(mask.sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked entries, got {n}")
    centered = x.to(_stat_dtype(x)) - masked_mean(x, mask)
    var = masked_mean(centered.square(), mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x − mean) / sqrt(var + 1e-8) with mean and (unbiased) var taken over the masked entries only.

    Used on PPO advantages (Huang et al. 2022, "The N+ implementation details of RLHF with PPO":
    whiten advantages per batch; with ``shift_mean=False`` the mean is added back, which is how rewards
    are whitened when their sign matters). Entries outside the mask are returned as 0. The statistics
    are those of THIS tensor, unless ``reduce_sum`` is given: a function that sums a tensor over every
    data-parallel process (e.g. ``lambda t: accelerator.reduce(t, "sum")``); the mean and variance are
    then those of every process's masked entries together (from the summed count, Σx and Σ(x − m)²
    around a first global mean m). With a single masked entry the variance is taken as 0.
    """
    mask = mask.bool()
    if reduce_sum is not None:
        return _whiten_global(x, mask, shift_mean, reduce_sum)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("masked_whiten: the mask selects no entry")
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=n > 1)
    whitened = (x.to(mean.dtype) - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0).to(x.dtype)


def _whiten_global(x: Tensor, mask: Tensor, shift_mean: bool, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
    dtype = _stat_dtype(x)
    xs = torch.where(mask, x.to(dtype), 0.0)
    totals = reduce_sum(torch.stack([mask.sum().to(dtype), xs.sum()]))
    n = int(totals[0])
    if n == 0:
        raise ValueError("masked_whiten: the mask selects no entry on any process")
    mean = totals[1] / n
    squares = reduce_sum(torch.where(mask, (x.to(dtype) - mean).square(), 0.0).sum())  # two-pass: no cancellation
    var = squares / (n - 1) if n > 1 else torch.zeros((), dtype=dtype)
    whitened = (x.to(dtype) - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0).to(x.dtype)


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16), per token.

        δ_t = r_t + γ·V_{t+1} − V_t,    A_t = Σ_l (γλ)^l δ_{t+l},    R_t = A_t + V_t (λ-return)

    Each row's response tokens are the steps of one episode (seed 000 "PPO additional details": the
    response as a per-token decision problem). The step after the last response token is terminal
    (V = 0). Steps are the masked positions in order, so responses may start at any column (left- or
    right-padded rows); unmasked positions in between are skipped, not treated as steps.

    Args:
        rewards: [B, T] per-token rewards (see ``token_level_rewards``).
        values: [B, T] value estimates V(s_t) of the state before token t is generated.
        response_mask: Bool[B, T].
        gamma, lam: discount γ and GAE λ (RLHF PPO usually uses γ = 1, λ = 0.95).
    Returns:
        (advantages [B, T], returns [B, T]), 0 outside the mask, no grad.
    """
    mask = response_mask.bool()
    dtype = torch.promote_types(_stat_dtype(rewards), values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=dtype, device=rewards.device)  # V after the last step: terminal
    next_adv = torch.zeros(B, dtype=dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv_t, 0.0)
        # Unmasked positions leave the carried state untouched (and their garbage is never selected).
        next_adv = torch.where(m, adv_t, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def _grouped(rewards: Tensor, k: int, name: str) -> Tensor:
    if k < 2:
        raise ValueError(f"{name} needs k >= 2 samples per prompt (got k={k}): with one sample there is no group baseline")
    rewards = torch.as_tensor(rewards).detach()
    if rewards.dim() == 2 and rewards.shape[1] != k:
        raise ValueError(f"{name}: rewards have shape {tuple(rewards.shape)}, expected [P, k={k}]")
    if rewards.dim() not in (1, 2) or rewards.numel() % k:
        raise ValueError(f"{name}: expected rewards [P*k] or [P, k] with k={k}, got shape {tuple(rewards.shape)}")
    return rewards.reshape(-1, k).to(_stat_dtype(rewards))


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, arXiv:2402.14740, eq. 6; Kool et al. 2019).

        A_i = r_i − 1/(k−1) · Σ_{j≠i} r_j     over the k samples of the same prompt

    The baseline excludes r_i, so it is independent of sample i and the gradient stays unbiased.

    Args: rewards [P*k] (prompt-major, see module docstring) or [P, k]; k ≥ 2.
    Returns: advantages [P*k], no grad.
    """
    grouped = _grouped(rewards, k, "rloo_advantages")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def group_normalized_advantages(rewards: Tensor, k: int, *, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2):

        A_i = (r_i − mean_group(r)) / (std_group(r) + eps)

    std is the unbiased (n − 1) standard deviation, as ``torch.std`` and TRL's GRPOTrainer use.
    ``scale=False`` keeps only the mean subtraction (Liu et al. 2025, "Dr. GRPO": dividing by the std
    up-weights prompts whose samples all score nearly the same).

    Args: rewards [P*k] (prompt-major) or [P, k]; k ≥ 2. Returns advantages [P*k], no grad.
    """
    grouped = _grouped(rewards, k, "group_normalized_advantages")
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


class MovingAverageBaseline:
    """Exponential moving average of the mean reward: the REINFORCE baseline b (seed 000
    "Gradient Derivation"; subtracting a constant b leaves E[∇log π · (r − b)] unchanged and lowers
    its variance; Williams 1992).

        adv = rewards − baseline.update(rewards)     # b from earlier batches only

    ``update`` returns the baseline BEFORE folding in this batch, then sets
    b ← decay·b + (1 − decay)·mean(rewards). Before the first update there is no history: unless an
    ``initial`` value is given, the first call returns that batch's own mean (so the first batch is
    centred on itself) and starts the average there. A data-parallel caller passes the gathered
    rewards so every process holds the same b.
    """

    def __init__(self, decay: float, initial: float | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value: float | None = None if initial is None else float(initial)

    def update(self, rewards: Tensor | Sequence[float]) -> float:
        rewards = torch.as_tensor(rewards, dtype=torch.float64).detach()
        if rewards.numel() == 0:
            raise ValueError("MovingAverageBaseline.update: empty rewards")
        batch_mean = float(rewards.mean())
        before = batch_mean if self.value is None else self.value
        self.value = self.decay * before + (1.0 - self.decay) * batch_mean
        return before

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = None if state["value"] is None else float(state["value"])


@torch.no_grad()
def token_level_rewards(
    scores: Tensor, kl_per_token: Tensor | None, response_mask: Tensor, *, kl_coef: float
) -> Tensor:
    """Per-token rewards with the KL penalty folded in (Ziegler et al. 2019, arXiv:1909.08593, eq. 1-2;
    InstructGPT, Ouyang et al. 2022, eq. 2; seed 000 "Regularized Objective"):

        r_t = −β·kl_t                     for every response token t
        r_T = score − β·kl_T              at the LAST response token of the row

    Summed over the response this is score − β·Σ_t kl_t, the seed's r(x, y) − β·log π_θ(y|x)/π_SFT(y|x)
    when kl_t is the k1 estimate (see ``rollout.kl``).

    Args:
        scores: [B] sequence-level rewards (e.g. a reward model or VADER score per response).
        kl_per_token: [B, T] per-token KL estimates, or None for no penalty.
        response_mask: Bool[B, T]; every row needs at least one response token.
        kl_coef: β (a float; ``AdaptiveKLController.value``).
    Returns: rewards [B, T], 0 outside the mask, no grad.
    """
    mask = response_mask.bool()
    B, T = mask.shape
    has_tokens = mask.any(dim=1)
    if not bool(has_tokens.all()):
        rows = torch.nonzero(~has_tokens).flatten().tolist()
        raise ValueError(f"token_level_rewards: rows {rows} have no response token to carry the score")
    dtype = _stat_dtype(scores) if kl_per_token is None else torch.promote_types(_stat_dtype(scores), kl_per_token.dtype)
    rewards = torch.zeros(B, T, dtype=dtype, device=mask.device)
    if kl_per_token is not None:
        rewards = torch.where(mask, -kl_coef * kl_per_token.to(dtype), 0.0)
    # Index of the last True per row: argmax finds the first True of the flipped row.
    last = T - 1 - mask.flip(dims=[1]).to(torch.int8).argmax(dim=1)
    rows = torch.arange(B, device=mask.device)
    rewards[rows, last] += scores.to(dtype).reshape(B)
    return rewards


def zero_variance_groups(rewards: Tensor, k: int) -> Tensor:
    """Bool[P]: True for the prompts whose k rewards are all equal. Their group-relative advantages
    are all 0, so they carry no gradient (DAPO, Yu et al. 2025, arXiv:2503.14476, §3.2 "dynamic
    sampling" drops and refills them). Args: rewards [P*k] (prompt-major) or [P, k]."""
    grouped = _grouped(rewards, k, "zero_variance_groups")
    return (grouped == grouped[:, :1]).all(dim=1)


@torch.no_grad()
def overlong_penalty(lengths: Tensor, *, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), added to the reward:

        0                                  if |y| ≤ L_max − L_cache
        ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max
        −1                                 if |y| > L_max

    times ``factor``. L_max = ``max_length`` (the completion budget), L_cache = ``buffer`` tokens before it
    over which the penalty grows linearly from 0 to −1.

    Args: lengths [B] completion lengths in tokens. Returns: penalties [B] (≤ 0), float32.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must lie in (0, max_length={max_length}], got {buffer}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    soft = (max_length - buffer - lengths) / buffer
    penalty = torch.where(lengths <= max_length - buffer, torch.zeros_like(lengths), soft)
    return factor * torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


@torch.no_grad()
def reinforce_pp_advantages(
    scores: Tensor, kl_per_token: Tensor | None, response_mask: Tensor, *, kl_coef: float, k: int | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262, §3): per-token advantages without a critic,

        A_t = r(x, y) − β · Σ_{i ≥ t} KL_i,      then  A ← (A − mean) / std   over the GLOBAL batch's tokens

    (γ = 1). With ``k`` (REINFORCE++-baseline, same paper, §3.2), the score is first centred on the mean
    of its prompt's k samples: r_i − mean_group(r), and the global normalisation follows.

    Args:
        scores: [B] sequence rewards, prompt-major when ``k`` is given.
        kl_per_token: [B, T] KL estimates (KL in the reward), or None (KL as a loss term, or β = 0).
        response_mask: Bool[B, T]; kl_coef: β.
        reduce_sum: sums a tensor over every data-parallel process (see ``masked_whiten``), so the
            normalisation is that of the global batch and does not depend on the number of processes.
    Returns: advantages [B, T], 0 outside the mask.
    """
    mask = response_mask.bool()
    scores = torch.as_tensor(scores, dtype=_stat_dtype(torch.as_tensor(scores))).detach()
    if k is not None:
        grouped = _grouped(scores, k, "reinforce_pp_advantages")
        scores = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    rewards = token_level_rewards(scores, kl_per_token, mask, kl_coef=kl_coef)
    to_go, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)  # Σ_{i ≥ t} r_i
    return masked_whiten(to_go, mask, reduce_sum=reduce_sum)
