"""Annotator groups in reward-model training (``reward.groups``) and per-group held-out accuracy.

- ``pooled``: one Bradley–Terry model on everyone's pairs (the baseline; groups are only reported).
- ``conditioned``: one model for all groups, each pair's prompt carrying its group
  (``preftune.data.groups.condition_prompt``), so r(x, y | g) can differ between groups. Score a
  completion for group G by writing G into the prompt the same way.

Whenever the evaluated pairs carry groups, ``reward_eval.json`` gets ``groups``: accuracy, pairs and
mean margin per group, so the minority's accuracy under pooling is visible.
"""

from __future__ import annotations

import logging

import torch

from preftune.data.groups import check_held_out_groups, condition_on_group, group_names

log = logging.getLogger("preftune.algorithms")

GROUP_MODES = ("pooled", "conditioned")


def apply_groups(mode: str, records: list, source: str) -> list:
    """The training (or held-out) records for ``reward.groups = mode``."""
    if mode == "pooled":
        return records
    group_names(records, source)  # every row has a group, at least two of them
    return condition_on_group(records, source)


def check_eval_groups(mode: str, train_records: list, eval_records: list, source: str) -> None:
    """A held-out file's groups must be the training data's (warns for a group it lacks)."""
    if mode != "pooled" and train_records:
        check_held_out_groups(group_names(train_records, source), eval_records, source)


def per_group_accuracy(pairs: list, chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """{group: {"pairs", "accuracy", "margin"}} over the pairs that carry a group (empty if none do)."""
    out: dict[str, dict] = {}
    for name in sorted({p.group for p in pairs if getattr(p, "group", None) is not None}):
        idx = torch.tensor([i for i, p in enumerate(pairs) if p.group == name])
        diff = (chosen[idx] - rejected[idx]).float()
        out[name] = {"pairs": len(idx), "accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    return out
