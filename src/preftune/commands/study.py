"""`preftune study [CONFIG.yaml] [key=value ...]`: the sentiment-control study (or, with ``study: diverse``
in the file, the diverse-preferences study); `preftune demo` runs the short one through :func:`run`."""

from __future__ import annotations

import argparse

from preftune.commands.base import add_settings_command
from preftune.config import read_yaml
from preftune.experiments import diverse, sentiment


def register(sub) -> None:
    add_settings_command(sub, "study", "The sentiment-control study with any mix of jobs (configs/studies/sentiment.yaml: the full one).",
                         sentiment.StudyConfig, "output_dir=runs/study", run)


def run(args: argparse.Namespace) -> int:
    load_study_config, run_study, summary = sentiment.load_study_config, sentiment.run_study, sentiment.summary
    if args.config and _study_kind(args.config) == "diverse":
        load_study_config, run_study, summary = diverse.load_diverse_config, diverse.run_diverse_study, diverse.summary
    cfg = load_study_config(args.config, list(args.overrides))
    report = run_study(cfg)
    print(summary(report))
    print(f"report: {report}")
    print(f"results: {report.parent / 'results.json'}")
    return 0


def _study_kind(path: str) -> str | None:
    """The ``study:`` key of a study file (None = the sentiment study, whose files have none)."""
    data = read_yaml(path)
    return data.get("study") if isinstance(data, dict) else None
