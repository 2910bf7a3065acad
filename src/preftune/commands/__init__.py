"""One module per CLI command, each built the same way: ``register(sub)`` adds the command's subparser
(``set_defaults(func=run)``), ``run(args) -> int`` runs it. ``preftune.cli`` builds the parser from
:data:`COMMANDS` and dispatches; a new command is a new module here and one entry in the list.
"""

from __future__ import annotations

from preftune.commands import (
    algorithms,
    collect,
    config,
    eval,
    export,
    generate,
    label,
    pipeline,
    score,
    study,
    train,
)

COMMANDS = [train, generate, score, eval, label, collect, pipeline, study, export, config, algorithms]
"""The command modules, in the order of ``preftune --help`` (demo, the study's short form, is added by cli.py)."""
