"""`preftune train CONFIG.yaml [key=value ...] [--resume]`: any algorithm from a run config."""

from __future__ import annotations

import argparse

from preftune.algorithms import ALGORITHMS
from preftune.commands.base import field_help
from preftune.config import RunConfig
from preftune.run_config import load_run_config
from preftune.train.ensemble import train_members


def register(sub) -> None:
    p = sub.add_parser("train", help="Train any algorithm from a config.", epilog=_train_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/).")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.learning_rate=1e-4")
    p.add_argument("--resume", action="store_true",
                   help="Continue from the newest checkpoint in output_dir (same as train.resume_from=latest).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume_from=latest")
    for result in train_members(load_run_config(args.config, overrides)):  # one run, or e.g. each ensemble member
        print(f"model saved to {result.model_dir}")
        print(f"metrics in {result.metrics_path}")
        if result.last_metrics:
            print("last step: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.last_metrics.items()))
    return 0


def _train_help() -> str:
    parts = [field_help(RunConfig, "Run settings (dotted keys):")]
    for name, cls in ALGORITHMS.items():
        parts.append(field_help(cls.Config, f"Section '{name}:' (algorithm: {name}):").replace("\n  ", f"\n  {name}."))
    return "\n\n".join(parts)
