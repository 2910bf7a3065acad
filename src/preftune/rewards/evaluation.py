"""How good is a reward model? Pure functions of scores, giving JSON-ready dicts.

Used for ``OUTPUT_DIR/reward_eval.json`` at the end of reward-model training and by ``preftune score``.

- pairwise accuracy, mean margin r_w − r_l, Bradley–Terry log-likelihood (mean log σ(r_w − r_l));
- calibration: a BT model claims P(the higher-scored completion is preferred) = σ(|r_a − r_b|).
  Pairs are binned by that claim (in [0.5, 1]) and each bin's mean claim is set against the
  fraction of its pairs where the higher-scored completion is the labelled winner (Anthropic's
  preference-model calibration plots, Bai et al. 2022, fig. 9); ``ece`` is the count-weighted mean
  |claim − observed| over bins. A tie (r_a = r_b) claims 0.5 and counts as half right;
- the distribution of rewards (mean, std, quantiles);
- with a gold reward: Pearson and Spearman correlation of learned with gold rewards, and how often
  the learned and the gold reward order a pair the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Floats = Sequence[float] | torch.Tensor


def _t(x: Floats) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).flatten()


def reward_stats(scores: Floats) -> dict:
    """count, mean, std (population), min, p10, p50, p90, max."""
    s = _t(scores)
    if s.numel() == 0:
        return {"count": 0}
    q = torch.quantile(s, torch.tensor([0.1, 0.5, 0.9], dtype=s.dtype)).tolist()
    return {
        "count": s.numel(), "mean": s.mean().item(), "std": s.std(unbiased=False).item(), "min": s.min().item(),
        "p10": q[0], "p50": q[1], "p90": q[2], "max": s.max().item(),
    }  # fmt: skip


def pearson(x: Floats, y: Floats) -> float | None:
    """Pearson correlation; None for fewer than 2 points or a constant input."""
    x, y = _t(x), _t(y)
    if x.numel() < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return None if denom == 0 else (x * y).sum().div(denom).item()


def average_ranks(x: Floats) -> torch.Tensor:
    """Ranks 1..n, tied values sharing their mean rank (as Spearman's rho needs)."""
    x = _t(x)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Floats, y: Floats) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks)."""
    return pearson(average_ranks(x), average_ranks(y))


def calibration(chosen: Floats, rejected: Floats, bins: int = 10) -> dict:
    """Claimed vs observed P(higher-scored completion is the preferred one), in ``bins`` equal bins of [0.5, 1]."""
    diff = _t(chosen) - _t(rejected)
    claim = torch.sigmoid(diff.abs())
    right = torch.where(diff == 0, torch.full_like(diff, 0.5), (diff > 0).to(diff.dtype))
    index = ((claim - 0.5) * 2 * bins).floor().clamp(0, bins - 1).long()
    table, ece = [], 0.0
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        row = {"lo": 0.5 + 0.5 * b / bins, "hi": 0.5 + 0.5 * (b + 1) / bins, "count": n}
        if n:
            row["predicted"], row["observed"] = claim[sel].mean().item(), right[sel].mean().item()
            ece += n * abs(row["predicted"] - row["observed"])
        table.append(row)
    return {"bins": table, "ece": ece / max(diff.numel(), 1)}


def pair_report(
    chosen: Floats,
    rejected: Floats,
    *,
    bins: int = 10,
    gold_chosen: Floats | None = None,
    gold_rejected: Floats | None = None,
    member_chosen: torch.Tensor | None = None,
    member_rejected: torch.Tensor | None = None,
) -> dict:
    """Everything about a reward model on labelled pairs (chosen preferred to rejected).

    ``member_*``: Tensor[M, n], the ensemble members' scores (adds per-member accuracy and spread).
    """
    c, r = _t(chosen), _t(rejected)
    diff = c - r
    report = {
        "pairs": c.numel(),
        "accuracy": (diff > 0).double().mean().item() if c.numel() else math.nan,
        "ties": int((diff == 0).sum()),
        "mean_margin": diff.mean().item() if c.numel() else math.nan,
        "bt_log_likelihood": torch.nn.functional.logsigmoid(diff).mean().item() if c.numel() else math.nan,
        "calibration": calibration(c, r, bins),
        "rewards": reward_stats(torch.cat([c, r])),
        "rewards_chosen": reward_stats(c),
        "rewards_rejected": reward_stats(r),
    }
    if gold_chosen is not None and gold_rejected is not None:
        gc, gr = _t(gold_chosen), _t(gold_rejected)
        gold_diff = gc - gr
        decided = gold_diff != 0
        report["gold"] = {
            "pearson": pearson(torch.cat([c, r]), torch.cat([gc, gr])),
            "spearman": spearman(torch.cat([c, r]), torch.cat([gc, gr])),
            "label_agreement": (gold_diff > 0).double().mean().item(),  # how often gold agrees with the labels
            "pair_agreement": ((diff * gold_diff) > 0)[decided].double().mean().item() if bool(decided.any()) else None,
        }
    if member_chosen is not None and member_rejected is not None:
        mc, mr = member_chosen.double(), member_rejected.double()
        report["ensemble"] = {
            "members": mc.shape[0],
            "member_accuracy": ((mc - mr) > 0).double().mean(1).tolist(),
            "mean_std": torch.cat([mc, mr], 1).std(0, unbiased=False).mean().item(),
        }
    return report


def score_report(scores: Floats, *, gold: Floats | None = None) -> dict:
    """Reward statistics of unpaired completions, and correlations with gold rewards if given."""
    report = {"rewards": reward_stats(scores)}
    if gold is not None:
        report["gold"] = {"pearson": pearson(scores, gold), "spearman": spearman(scores, gold)}
    return report


def json_ready(value):
    """A report with NaN/inf replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value
