"""What every command module shares: its settings from a YAML file + key=value overrides, and help
text generated from the settings' one-and-only field help.

A command module exposes ``register(sub)`` (adds its subparser, ``set_defaults(func=run)``) and
``run(args) -> int`` (the exit status); ``preftune.cli`` builds the parser from the list in
``preftune.commands`` and dispatches.
"""

from __future__ import annotations

import argparse
from typing import Callable

from preftune.config import apply_overrides, describe, from_dict, read_yaml


def field_help(cls: type, title: str) -> str:
    """Every field of config class ``cls`` with its type, default and help, under ``title``."""
    lines = [title]
    for key, tp, default, help_text in describe(cls):
        lines.append(f"  {key} ({tp}, default {default!r})\n      {help_text}")
    return "\n".join(lines)


def settings(cls: type, args: argparse.Namespace, name: str):
    """A command's settings: the optional YAML file, then the key=value overrides, validated."""
    data = read_yaml(args.config) if args.config else {}
    return from_dict(cls, apply_overrides(data, list(args.overrides)), name)


def add_settings_command(sub, name: str, text: str, cls: type, example: str, func: Callable) -> argparse.ArgumentParser:
    """A command configured by an optional YAML file plus key=value settings of ``cls``."""
    c = sub.add_parser(name, help=text, epilog=field_help(cls, "Settings (key=value):"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", nargs="?", help="Optional YAML file with the settings below.")
    c.add_argument("overrides", nargs="*", help=f"key=value settings, e.g. {example}")
    c.set_defaults(func=func)
    return c
