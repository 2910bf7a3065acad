"""`preftune eval`: models against a reference on a prompts file -> results.json + report.html (the
settings and the run in preftune/eval/run.py).

    preftune eval models=[dpo=runs/dpo/model,rloo=runs/rloo/model] prompts=builtin:movie_review_prompts max_rows=64
"""

from __future__ import annotations

import argparse

from preftune.commands.base import add_settings_command, settings
from preftune.eval.run import EvalConfig, run_eval


def register(sub) -> None:
    add_settings_command(sub, "eval", "Compare models with a reference: reward, KL, win rate, ...; writes report.html.", EvalConfig,
                         "models=[dpo=runs/dpo/model] max_rows=64", run)


def run(args: argparse.Namespace) -> int:
    path = run_eval(settings(EvalConfig, args, "eval"))
    print(f"results in {path.parent / 'results.json'}")
    print(f"report written to {path}")
    return 0
