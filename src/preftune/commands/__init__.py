"""One module per CLI command, each built the same way: ``register(sub)`` adds the command's subparser
(``set_defaults(func=run)``), ``run(args) -> int`` runs it. ``preftune.cli`` builds the parser from
:data:`COMMANDS` and dispatches; a new command is a new module here and one entry in the list.
"""

from __future__ import annotations

from preftune.commands import algorithms, config, eval, export, generate, score, study, train

COMMANDS = [train, generate, score, eval, study, export, config, algorithms]
"""The command modules, in the order of ``preftune --help`` (label, collect and demo are added by cli.py)."""
