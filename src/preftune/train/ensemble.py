"""Runs that one config stands for (e.g. the members of a reward-model ensemble), trained through
the loop one after another. ``preftune train`` and Python callers both use :func:`train_members`::

    from preftune.run_config import load_run_config
    from preftune.train.ensemble import train_members
    results = train_members(load_run_config("configs/reward_tiny.yaml", ["reward.ensemble_size=3"]))

With ``train.resume_from=latest`` every member continues from its own newest checkpoint; a member
that has none starts fresh, and one whose model is already saved is skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from preftune.algorithms import ALGORITHMS
from preftune.config import ConfigError, RunConfig
from preftune.train.checkpoint import list_checkpoints
from preftune.train.loop import TrainResult, train

log = logging.getLogger("preftune.train")


def member_runs(run: RunConfig) -> list[RunConfig]:
    """The runs to train for ``run``: the algorithm's members (the run itself for most), prepared to resume."""
    members = ALGORITHMS[run.algorithm].member_runs(run)
    if members == [run]:
        return members
    if run.train.resume_from not in (None, "latest"):
        raise ConfigError("train.resume_from: an ensemble resumes with 'latest' (each member from its own newest checkpoint)")
    runs = []
    for member in members:
        if member.train.resume_from == "latest" and not list_checkpoints(Path(member.output_dir)):
            if ALGORITHMS[run.algorithm].is_trained(Path(member.output_dir)):
                log.info("%s: already trained (and no checkpoint to continue from); skipped", member.output_dir)
                continue
            member.train.resume_from = None  # --resume: members not started yet start fresh
        runs.append(member)
    return runs


def train_members(run: RunConfig) -> list[TrainResult]:
    """Train every run ``run`` stands for (see :func:`member_runs`), in turn."""
    return [train(member) for member in member_runs(run)]
