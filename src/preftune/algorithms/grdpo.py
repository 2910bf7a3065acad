"""Group-robust DPO (Ramesh et al. 2024, "Group Robust Preference Optimization in Reward-free RLHF").

DPO pooled over groups serves the majority: its loss is the mean over rows, so a group with 20% of
the pairs gets 20% of the gradient. GRPO (here ``grdpo``, not to be confused with the RL method of
the same initials) minimises the worst group's DPO loss instead, min_θ max_{α ∈ simplex} Σ_g α_g ·
L_g(θ), by alternating an exponentiated-gradient step on α (α_g ← α_g · exp(η · L_g), normalised)
with a gradient step on θ for the α-weighted loss (``preftune.losses.diverse``).

Rows carry a ``group`` field (data without one is a single group, and a warning: grdpo is then DPO);
the group weights α are logged in metrics.jsonl as ``group_weight/G``
(and each group's DPO loss as ``group_loss/G``) and saved with the model (``group_weights.json``).
One deviation from the paper's Algorithm 1: α is updated at the start of a step from the group
losses of the previous step (measured during its forward), which saves a second forward pass.
The weights (and the group losses gathered since their last update) are part of every checkpoint, so
``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.algorithms.dpo import DPOConfig
from preftune.algorithms.pairwise import PairwiseAlgorithm
from preftune.config import check_range, doc
from preftune.data.groups import check_held_out_groups, group_index, group_names
from preftune.losses.diverse import group_robust_dpo_loss, group_robust_weights

log = logging.getLogger("preftune.algorithms")


@dataclass
class GroupRobustDPOConfig(DPOConfig):
    step_size: float = doc(
        0.5, "η: step size of the group weights' exponentiated-gradient update α_g ← α_g·exp(η·L_g); 0 = fixed "
        "uniform weights over groups (each group's mean loss counts equally, whatever its size).",
    )

    def validate(self, path: str) -> None:
        super().validate(path)
        check_range(path, self, non_negative=("step_size",))


class GroupRobustDPO(PairwiseAlgorithm):
    """Group-robust DPO (Ramesh et al. 2024): DPO weighted towards the group with the worst loss."""

    name = "grdpo"
    Config = GroupRobustDPOConfig

    def __init__(self, config, policy, tokenizer, run):
        super().__init__(config, policy, tokenizer, run)
        self.group_names: list[str] = []
        self._counts = None  # rows of each group in the current global batch

    @classmethod
    def first_loss(cls, config):
        return math.log(2)  # every group's DPO loss is ln 2 when policy = reference

    def group_index(self, records: list, source: str) -> dict:
        if self.group_names:  # the training data came first and fixed the groups
            if self.group_names != [None]:
                check_held_out_groups(self.group_names, records, source)
            return group_index(self.group_names)
        if all(r.group is None for r in records):
            log.warning("%s: no row has a 'group', so every row is in one group and grdpo is DPO", source)
            self.group_names = [None]  # rows without a group: index 0
        else:
            self.group_names = group_names(records, source, min_groups=1)
            if len(self.group_names) == 1:
                log.warning("%s, field 'group': one group (%r), so grdpo is DPO", source, self.group_names[0])
        g = len(self.group_names)
        self.register_buffer("group_weights", torch.full((g,), 1.0 / g))
        self.register_buffer("_loss_sums", torch.zeros(2, g))  # (sum of DPO losses, rows) since the last update
        return group_index(self.group_names)

    def before_step(self, micro_batches: list[dict], accelerator) -> None:
        sums = accelerator.reduce(self._loss_sums.clone(), reduction="sum") if accelerator.num_processes > 1 else self._loss_sums
        if sums[1].sum() > 0:
            present = sums[1] > 0
            losses = sums[0] / sums[1].clamp(min=1)
            self.group_weights.copy_(group_robust_weights(self.group_weights, losses, step_size=self.config.step_size, present=present))
            self._loss_sums.zero_()
        g = len(self.group_names)
        counts = sum(torch.bincount(b["group"].cpu(), minlength=g).float() for b in micro_batches)
        counts = counts.to(self.group_weights.device)
        self._counts = accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts

    def loss(self, batch, out, logps):
        groups = batch["group"].long()
        g = len(self.group_names)
        counts = self._counts if self.training and self._counts is not None else torch.bincount(groups, minlength=g).float()
        device = logps.policy_chosen_logps.device
        losses, m = group_robust_dpo_loss(*logps, groups, self.group_weights, counts.to(device), beta=self.config.beta)
        per_group = torch.zeros(2, g, device=device, dtype=torch.float32)
        per_group[0].index_add_(0, groups, m.pop("dpo_losses").float())
        per_group[1].index_add_(0, groups, torch.ones_like(groups, dtype=torch.float32))
        if self.training:
            self._loss_sums += per_group.to(self._loss_sums.device)
        self._group_metrics = per_group
        return losses, m

    def forward(self, batch):
        loss, metrics = super().forward(batch)
        sums, rows = self._group_metrics
        one = torch.ones((), device=sums.device)
        for i, name in enumerate(self.group_names):
            name = "all" if name is None else name
            metrics[f"group_loss/{name}"] = (sums[i], rows[i])
            metrics[f"group_weight/{name}"] = (self.group_weights[i].detach().float(), one)
        return loss, metrics

    def extra_state(self) -> dict:
        return {"group_weights": self.group_weights.detach().cpu().clone(), "loss_sums": self._loss_sums.detach().cpu().clone()}

    def load_extra_state(self, state: dict) -> None:
        self.group_weights.copy_(state["group_weights"])
        self._loss_sums.copy_(state["loss_sums"])

    def save(self, out_dir: Path) -> None:
        super().save(out_dir)
        weights = {"all" if g is None else g: w for g, w in zip(self.group_names, self.group_weights.tolist())}
        (Path(out_dir) / "group_weights.json").write_text(json.dumps({"group_weights": weights}, indent=2) + "\n")
