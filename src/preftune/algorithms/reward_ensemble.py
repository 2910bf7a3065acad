"""Reward-model ensembles (``reward.ensemble_size: N``): N independent models trained one after another
through the loop (preftune/train/ensemble.py) into ``OUTPUT_DIR/member-i/``. Member i differs by its
initialisation seed and its data order; all keep the same held-out split, so the ensemble is
evaluated on data none of them saw. ``OUTPUT_DIR/ensemble.json`` names the members and the combine
rule that ``RewardModel.load`` and ``preftune score`` use by default."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

from preftune.algorithms.reward_groups import group_member_runs
from preftune.algorithms.reward_report import REPORT_FILE
from preftune.models.cache import write_json
from preftune.rewards.evaluation import json_ready
from preftune.rewards.model import ENSEMBLE_FILE, SPEC_FILE, RewardModel

log = logging.getLogger("preftune.algorithms")


def member_runs(cls, run) -> list:
    """One run per member (``OUTPUT_DIR/member-i``), or per group with ``groups: per_group``; else the run."""
    if run.algo.groups == "per_group" and run.algo.group is None:
        return group_member_runs(cls, run)
    if run.algo.ensemble_size == 1:
        return [run]
    runs = []
    for i in range(run.algo.ensemble_size):
        member = copy.deepcopy(run)
        member.output_dir = str(Path(run.output_dir) / f"member-{i}")
        member.algo.member = i
        runs.append(member)
    return runs


def member_seed(seed: int, member: int) -> int:
    """Seed of ensemble member ``member`` (member 0 = the run's seed)."""
    return seed + 1_000_003 * member


def save_ensemble(root: Path, config, report: Callable, device, batch_size: int) -> None:
    """``root/ensemble.json`` (members and combine rule); the last member to finish also writes the
    ensemble's report (``report(ensemble) -> dict``)."""
    n = config.ensemble_size
    members = [f"member-{i}/model" for i in range(n)]
    write_json(root / ENSEMBLE_FILE, json_ready({"members": members, "combine": config.combine, "k": config.combine_k}), default=str)
    if not all((root / m / SPEC_FILE).is_file() for m in members):
        return  # the last member to finish writes the ensemble's report
    ensemble = RewardModel.load(root, device=device, batch_size=batch_size)
    result = report(ensemble)
    write_json(root / REPORT_FILE, json_ready(result), default=str)
    log.info("ensemble of %d: accuracy %.4f (members %s); report in %s", n, result["accuracy"],
             [round(a, 4) for a in result["ensemble"]["member_accuracy"]], root / REPORT_FILE)  # fmt: skip
