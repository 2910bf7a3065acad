"""`preftune <command>`: every command is a config (YAML file and/or dotted key=value overrides).

    preftune train CONFIG.yaml [key=value ...] [--resume]
    preftune generate [CONFIG.yaml] [key=value ...]
    preftune score [CONFIG.yaml] [key=value ...]    # reward-model scores of (prompt, completion) rows
    preftune eval [CONFIG.yaml] [key=value ...]     # models vs a reference -> results.json + report.html
    preftune label [CONFIG.yaml] [key=value ...]    # rank samples in a web UI (or with a judge) -> labels
    preftune collect create|invite|serve|status|export PROJECT [...]   # team labelling: accounts, overlap, agreement
    preftune pipeline PIPELINE.yaml [key=value ...] [--resume]   # rounds of generate -> label -> train -> evaluate
    preftune export CHECKPOINT [--output DIR]       # a training checkpoint -> a loadable model folder
    preftune config [ALGORITHM] [--markdown]      # every field, its default and its help
    preftune algorithms

Each command is one module of preftune/commands/ (``register(sub)`` + ``run(args)``); this module only
builds the parser from that list and dispatches.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from preftune import __version__
from preftune.commands import COMMANDS, study
from preftune.commands.base import add_settings_command
from preftune.commands.config import config_markdown  # noqa: F401  (preftune.cli.config_markdown, as before)
from preftune.config import ConfigError
from preftune.data.records import DataError
from preftune.experiments.sentiment import StudyConfig
from preftune.models.loading import ModelLoadError
from preftune.train.checkpoint import CheckpointError
from preftune.train.guard import NonFiniteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Preference-based fine-tuning of language models.")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    add_settings_command(sub, "demo", "The short sentiment-control study on the default model (~8 min on a 2-core CPU); writes report.html.",
                         StudyConfig, "output_dir=runs/demo2", study.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists() and args.command in ("generate", "score", "eval", "label", "demo", "study"):
        args.overrides = [args.config] + list(args.overrides)
        args.config = None
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
