"""Annotator groups in reward-model training (``reward.groups``) and per-group held-out accuracy.

- ``pooled``: one Bradley–Terry model on everyone's pairs (the baseline; groups are only reported).
- ``per_group``: one model per group, trained on (and evaluated on) that group's rows only, in
  ``OUTPUT_DIR/group-G/`` (``group_member_runs``); score for group G with that folder.
- ``conditioned``: one model for all groups, each pair's prompt carrying its group
  (``preftune.data.groups.condition_prompt``), so r(x, y | g) can differ between groups. Score a
  completion for group G by writing G into the prompt the same way.

Whenever the evaluated pairs carry groups, ``reward_eval.json`` gets ``groups``: accuracy, pairs and
mean margin per group, so the minority's accuracy under pooling is visible.

- ``mixture``: groups unknown; K reward heads fitted by EM over the annotators (algorithms/reward_mixture.py).
- ``distributional``: groups hidden; a mean and a spread per completion (algorithms/reward_distributional.py).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from preftune.data.groups import check_held_out_groups, condition_on_group, group_names
from preftune.data.records import DataError

log = logging.getLogger("preftune.algorithms")

GROUP_MODES = ("pooled", "per_group", "conditioned", "mixture", "distributional")


def apply_groups(mode: str, records: list, source: str, group: str | None = None) -> list:
    """The training (or held-out) records for ``reward.groups = mode`` (``group``: per_group's group)."""
    if mode in ("pooled", "mixture", "distributional"):  # the mixture's annotators: checked on the training rows (RewardMixture)
        return records
    names = group_names(records, source)  # every row has a group, at least two of them
    if mode == "per_group":
        if group is not None and group not in names:
            raise DataError(f"no rows of group {group!r} (groups: {', '.join(names)})", source=source, field="group")
        return [r for r in records if group is None or r.group == group]
    return condition_on_group(records, source)


def group_member_runs(cls, run) -> list:
    """reward.groups=per_group: one run per group of the training data, into OUTPUT_DIR/group-G."""
    names = group_names(cls._read_records(run.algo, run.data.path, run.data.split), str(run.data.path))
    runs = []
    for name in names:
        member = copy.deepcopy(run)
        member.output_dir = str(Path(run.output_dir) / f"group-{name}")
        member.algo.group = name
        runs.append(member)
    return runs


def check_eval_groups(mode: str, train_records: list, eval_records: list, source: str) -> None:
    """A held-out file's groups must be the training data's (warns for a group it lacks)."""
    if mode == "conditioned" and train_records:
        check_held_out_groups(group_names(train_records, source), eval_records, source)


def per_group_accuracy(pairs: list, chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """{group: {"pairs", "accuracy", "margin"}} over the pairs that carry a group (empty if none do)."""
    out: dict[str, dict] = {}
    for name in sorted({p.group for p in pairs if getattr(p, "group", None) is not None}):
        idx = torch.tensor([i for i, p in enumerate(pairs) if p.group == name])
        diff = (chosen[idx] - rejected[idx]).float()
        out[name] = {"pairs": len(idx), "accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    return out
